"""Generate tokenmill sample_data files from hand-written pieces (deterministic)."""
import json
import os
import random
import sys

import banks_en as E
import banks_zh as Z
import sft_en as SE
import sft_zh as SZ

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


class Slots(dict):
    """format_map mapping: fixed per-document context + fresh numbers per lookup."""

    def __init__(self, rng, ctx):
        super().__init__(ctx)
        self.rng = rng

    def __missing__(self, key):
        r = self.rng
        if key == "n_small":
            return str(r.randint(2, 9))
        if key == "n_mid":
            return str(r.randint(10, 45))
        if key == "n_big":
            return f"{r.randint(120, 4800):,}" if self.get("_lang") == "en" else str(r.randint(120, 4800))
        if key == "pct":
            return str(r.choice([65, 70, 72, 75, 78, 80]))
        if key == "date":
            return str(r.randint(1, 28))
        if key == "veg":
            return r.choice(E.VEG) if self.get("_lang") == "en" else r.choice(Z.VEG)
        if key == "veg_cap":
            return r.choice(E.VEG).capitalize()
        if key == "bird":
            return r.choice(E.BIRDS)
        if key == "tree":
            return r.choice(E.TREES)
        if key == "day":
            return r.choice(E.DAYS)
        if key == "weekday":
            return r.choice(Z.WEEKDAYS)
        if key == "month_n":
            return str(r.randint(1, 12))
        if key == "tea":
            return r.choice(Z.TEAS)
        if key == "term":
            return r.choice(Z.SOLAR_TERMS)
        raise KeyError(key)


def ctx_en(rng):
    streets = rng.sample(E.STREETS, 2)
    return {"_lang": "en", "name": rng.choice(E.NAMES),
            "fullname": f"{rng.choice(E.NAMES)} {rng.choice(E.SURNAMES)}",
            "town": rng.choice(E.TOWNS), "river": rng.choice(E.RIVERS), "street": streets[0],
            "street2": streets[1], "month": rng.choice(E.MONTHS)}


def ctx_zh(rng):
    return {"_lang": "zh", "name": rng.choice(Z.NAMES), "town": rng.choice(Z.TOWNS),
            "city": rng.choice(Z.CITIES), "river": rng.choice(Z.RIVERS), "street": rng.choice(Z.STREETS),
            "month": f"{rng.randint(1, 12)}月", "festival": rng.choice(Z.FESTIVALS)}


def fill(t, rng, ctx):
    return t.format_map(Slots(rng, ctx))


# ---------------------------------------------------------------- English pretraining
def en_essay(rng, topic=None, n_body=None):
    topic = topic or rng.choice(sorted(E.TOPICS))
    T = E.TOPICS[topic]
    ctx = ctx_en(rng)
    n_body = n_body if n_body is not None else rng.randint(2, len(T["body"]))
    parts = [rng.choice(T["open"])] + rng.sample(T["body"], min(n_body, len(T["body"])))
    if rng.random() < 0.7:
        parts.append(rng.choice(T["close"]))
    text = " ".join(fill(p, rng, ctx) for p in parts)
    if rng.random() < 0.25:
        text = fill(rng.choice(T["titles"]), rng, ctx) + ". " + text
    return text


def en_chronicle(rng, n):
    ctx = ctx_en(rng)
    year = rng.randint(1740, 1800)
    out = [f"A short history of {ctx['town']}.",
           f"{ctx['town']} grew up around a crossing of the {ctx['river']}, where a track between two market towns met the river at its shallowest point."]
    pool = E.CHRONICLE[:]
    rng.shuffle(pool)
    for t in pool[:n]:
        year += rng.randint(3, 14)
        c = dict(ctx, year=str(year), fullname=f"{rng.choice(E.NAMES)} {rng.choice(E.SURNAMES)}")
        out.append(fill(t, rng, c))
    out.append(f"Today {ctx['town']} is a quiet place, but the names of its streets still record much of this history.")
    return " ".join(out)


def en_diary(rng, days):
    ctx = ctx_en(rng)
    out = []
    pool = E.DIARY[:]
    rng.shuffle(pool)
    for d in range(1, days + 1):
        k = rng.randint(3, 6)
        if len(pool) < k:
            pool = E.DIARY[:]
            rng.shuffle(pool)
        today, pool = pool[:k], pool[k:]
        out.append(f"Day {d}.")
        out.extend(fill(s, rng, dict(ctx, town=rng.choice(E.TOWNS))) for s in today)
    return " ".join(out)


def en_recipe(rng):
    dish, ing = rng.choice(E.RECIPE_DISHES)
    ctx = ctx_en(rng)
    serves = rng.choice([2, 3, 4, 6])
    qty = ["200 g", "1 large", "2", "3 cloves", "500 ml", "1 tsp", "a handful of", "1 tbsp", "400 g", "half a"]
    items = ", ".join(f"{rng.choice(qty)} {i}" for i in ing)
    a, b, c, d = (ing + ing)[0], (ing + ing)[1], (ing + ing)[2], ing[-1]
    steps = [fill(s.replace("{a}", a).replace("{b}", b).replace("{c}", c).replace("{d}", d), rng, ctx)
             for s in E.RECIPE_STEPS[: rng.randint(5, len(E.RECIPE_STEPS))]]
    return (f"Easy {dish} (serves {serves}). Ingredients: {items}. Method: "
            + " ".join(f"{i + 1}. {s}" for i, s in enumerate(steps)))


def en_notice(rng):
    return fill(rng.choice(E.NOTICE), rng, ctx_en(rng))


def en_faq(rng):
    q, a = rng.choice(E.FAQ)
    return f"Q: {q} A: {a}"


def gen_pretrain_en(rng):
    docs = []
    # a few long documents (several thousand characters)
    docs.append(en_chronicle(rng, len(E.CHRONICLE)))
    docs.append(en_chronicle(rng, 16))
    docs.append(en_diary(rng, 9))
    docs.append(en_diary(rng, 6))
    for topic in ["software", "bread", "garden"]:
        d = []
        for _ in range(3):
            d.append(en_essay(rng, topic, n_body=len(E.TOPICS[topic]["body"])))
        docs.append(" ".join(d))
    kinds = ["essay"] * 60 + ["short"] * 10 + ["recipe"] * 8 + ["notice"] * 8 + ["faq"] * 5 + ["chron"] * 5 + ["diary"] * 4
    while len(docs) < 300:
        k = rng.choice(kinds)
        if k == "essay":
            docs.append(en_essay(rng))
        elif k == "short":
            docs.append(en_essay(rng, n_body=rng.randint(0, 2)))
        elif k == "recipe":
            docs.append(en_recipe(rng))
        elif k == "notice":
            docs.append(en_notice(rng))
        elif k == "faq":
            docs.append(en_faq(rng))
        elif k == "chron":
            docs.append(en_chronicle(rng, rng.randint(4, 10)))
        else:
            docs.append(en_diary(rng, rng.randint(1, 3)))
    rng.shuffle(docs)
    return docs


# ---------------------------------------------------------------- Chinese pretraining
def zh_essay(rng, topic=None, n_body=None, paragraphs=True):
    topic = topic or rng.choice(sorted(Z.TOPICS))
    T = Z.TOPICS[topic]
    ctx = ctx_zh(rng)
    n_body = n_body if n_body is not None else rng.randint(2, len(T["body"]))
    body = [fill(s, rng, ctx) for s in rng.sample(T["body"], min(n_body, len(T["body"])))]
    out = [fill(rng.choice(T["open"]), rng, ctx)]
    # split body into 1-3 paragraphs
    if paragraphs and len(body) >= 4 and rng.random() < 0.6:
        cut = rng.randint(2, len(body) - 2)
        paras = ["".join(out + body[:cut]), "".join(body[cut:])]
    else:
        paras = ["".join(out + body)]
    if rng.random() < 0.7:
        paras[-1] += fill(rng.choice(T["close"]), rng, ctx)
    return "\n".join(paras)


def zh_chronicle(rng, n):
    ctx = ctx_zh(rng)
    year = rng.randint(1890, 1930)
    out = [f"{ctx['town']}简史", f"{ctx['town']}位于{ctx['river']}边，早年因水运便利而形成集市，逐渐发展成为周边村庄的中心。"]
    pool = Z.CHRONICLE[:]
    rng.shuffle(pool)
    lines = []
    for t in pool[:n]:
        year += rng.randint(2, 7)
        if year > 2023:
            break
        lines.append(fill(t, rng, dict(ctx, year=str(year), name=rng.choice(Z.NAMES))))
    # group into paragraphs of 3-4 events
    paras = ["".join(lines[i:i + 4]) for i in range(0, len(lines), 4)]
    out += paras
    out.append(f"如今的{ctx['town']}依然保留着许多老建筑，街巷的名字也记录着这段历史。")
    return "\n".join(out)


def zh_diary(rng, days):
    ctx = ctx_zh(rng)
    out = []
    pool = Z.DIARY[:]
    nums = "一二三四五六七八九十"
    rng.shuffle(pool)
    for d in range(days):
        k = rng.randint(3, 6)
        if len(pool) < k:
            pool = Z.DIARY[:]
            rng.shuffle(pool)
        today, pool = pool[:k], pool[k:]
        sents = "".join(fill(s, rng, dict(ctx, town=rng.choice(Z.TOWNS))) for s in today)
        out.append(f"第{nums[d]}天：{sents}")
    return "\n".join(out)


def zh_notice(rng):
    return fill(rng.choice(Z.NOTICE), rng, ctx_zh(rng))


def gen_pretrain_zh(rng):
    docs = [zh_chronicle(rng, len(Z.CHRONICLE)), zh_chronicle(rng, 14), zh_diary(rng, 10), zh_diary(rng, 7)]
    nums = "一二三四五六七八九十"
    for n_topics in (13, 10, 8, 6):
        topics = rng.sample(sorted(Z.TOPICS), n_topics)
        parts = [rng.choice(["生活随笔", "周末札记", "小城生活手记", "一年的笔记"])]
        for i, t in enumerate(topics):
            parts.append(f"{nums[i % 10] if i < 10 else '十' + nums[i - 10]}、{TOPIC_NAMES_ZH[t]}")
            parts.append(zh_essay(rng, t, n_body=len(Z.TOPICS[t]["body"])))
        docs.append("\n".join(parts))
    for topic in ["coding", "cooking", "travel"]:
        docs.append("\n".join(zh_essay(rng, topic, n_body=len(Z.TOPICS[topic]["body"])) for _ in range(2)))
    kinds = ["essay"] * 62 + ["pair"] * 10 + ["short"] * 12 + ["notice"] * 10 + ["chron"] * 6 + ["diary"] * 6
    while len(docs) < 300:
        k = rng.choice(kinds)
        if k == "essay":
            docs.append(zh_essay(rng))
        elif k == "pair":
            docs.append("\n".join(zh_essay(rng, t) for t in rng.sample(sorted(Z.TOPICS), 2)))
        elif k == "short":
            docs.append(zh_essay(rng, n_body=rng.randint(0, 2), paragraphs=False))
        elif k == "notice":
            docs.append(zh_notice(rng))
        elif k == "chron":
            docs.append(zh_chronicle(rng, rng.randint(4, 8)))
        else:
            docs.append(zh_diary(rng, rng.randint(1, 3)))
    rng.shuffle(docs)
    return docs


# ---------------------------------------------------------------- math helpers (zh / en)
def fmt_num(x):
    if abs(x - round(x)) < 1e-9:
        return str(int(round(x)))
    return f"{x:.2f}".rstrip("0").rstrip(".")


def math_zh(rng):
    k = rng.randrange(6)
    if k == 0:
        a, p, b, q = rng.randint(2, 6), rng.choice([3, 4, 5, 6, 8, 12]), rng.randint(1, 5), rng.choice([2, 7, 9, 15])
        item1, item2 = rng.sample(["笔记本", "铅笔", "苹果", "橙子", "面包", "牛奶", "橡皮", "水彩笔"], 2)
        total = a * p + b * q
        pay = ((total // 50) + 1) * 50
        return (f"小明买了{a}个{item1}，每个{p}元，又买了{b}个{item2}，每个{q}元。他付了{pay}元，应该找回多少钱？",
                f"先算总价：{item1}花了 {a} × {p} = {a * p} 元，{item2}花了 {b} × {q} = {b * q} 元，一共 {a * p} + {b * q} = {total} 元。\n"
                f"再算找零：{pay} - {total} = {pay - total} 元。\n所以应该找回 {pay - total} 元。")
    if k == 1:
        v, t = rng.choice([4, 5, 12, 15, 18, 60, 80]), rng.choice([1.5, 2, 2.5, 3, 4])
        who = "骑自行车" if v < 30 else "开车"
        return (f"一个人{who}，每小时行驶{v}公里，{fmt_num(t)}小时能走多远？",
                f"路程 = 速度 × 时间 = {v} × {fmt_num(t)} = {fmt_num(v * t)} 公里。\n所以{fmt_num(t)}小时能走 {fmt_num(v * t)} 公里。")
    if k == 2:
        xs = [rng.randint(60, 100) for _ in range(rng.randint(4, 6))]
        s = sum(xs)
        return (f"某同学几次测验的成绩分别是 {'、'.join(map(str, xs))} 分，求平均分。",
                f"总分为 {' + '.join(map(str, xs))} = {s}，共 {len(xs)} 次测验。\n平均分 = {s} ÷ {len(xs)} = {fmt_num(s / len(xs))} 分。")
    if k == 3:
        price, d = rng.choice([80, 120, 150, 200, 260, 399, 500]), rng.choice([10, 15, 20, 25, 30])
        return (f"一件衣服原价{price}元，现在打{fmt_num((100 - d) / 10)}折出售，现价是多少？便宜了多少钱？",
                f"打{fmt_num((100 - d) / 10)}折就是按原价的 {100 - d}% 出售。\n现价 = {price} × {(100 - d) / 100:g} = {fmt_num(price * (100 - d) / 100)} 元。\n"
                f"便宜了 {price} - {fmt_num(price * (100 - d) / 100)} = {fmt_num(price * d / 100)} 元。")
    if k == 4:
        w, h = rng.randint(3, 20), rng.randint(2, 15)
        return (f"一块长方形菜地长{w}米、宽{h}米，它的面积和周长各是多少？",
                f"面积 = 长 × 宽 = {w} × {h} = {w * h} 平方米。\n周长 = (长 + 宽) × 2 = ({w} + {h}) × 2 = {(w + h) * 2} 米。")
    n, pct = rng.choice([40, 50, 120, 200, 250, 400]), rng.choice([10, 20, 25, 30, 35, 40, 60, 75])
    return (f"某校有{n}名学生参加兴趣小组，其中{pct}%选择了编程小组，选择编程小组的有多少人？",
            f"{n} × {pct}% = {n} × {pct / 100:g} = {fmt_num(n * pct / 100)} 人。\n所以选择编程小组的有 {fmt_num(n * pct / 100)} 人。")


def math_en(rng):
    k = rng.randrange(5)
    name = rng.choice(E.NAMES)
    if k == 0:
        a, p, b, q = rng.randint(2, 6), rng.choice([1.5, 2, 2.5, 3, 4]), rng.randint(1, 4), rng.choice([0.5, 1.25, 3, 6])
        total = a * p + b * q
        return (f"{name} buys {a} notebooks at ${p:.2f} each and {b} pens at ${q:.2f} each. How much does {name} spend in total?",
                f"Notebooks: {a} × ${p:.2f} = ${a * p:.2f}.\nPens: {b} × ${q:.2f} = ${b * q:.2f}.\nTotal: ${a * p:.2f} + ${b * q:.2f} = **${total:.2f}**.",
                (a, p, b, q))
    if k == 1:
        v, t = rng.choice([12, 15, 18, 20, 60, 80, 90]), rng.choice([1.5, 2, 2.5, 3])
        return (f"If a train travels at {v} km/h for {fmt_num(t)} hours, how far does it go?" if v > 30 else
                f"{name} cycles at {v} km/h for {fmt_num(t)} hours. How far does {name} ride?",
                f"Distance = speed × time = {v} × {fmt_num(t)} = **{fmt_num(v * t)} km**.", (v, t))
    if k == 2:
        xs = [rng.randint(50, 100) for _ in range(rng.randint(3, 6))]
        return (f"What is the average of these scores: {', '.join(map(str, xs))}?",
                f"Add them up: {' + '.join(map(str, xs))} = {sum(xs)}.\nThere are {len(xs)} scores, so the average is {sum(xs)} ÷ {len(xs)} = **{fmt_num(sum(xs) / len(xs))}**.",
                xs)
    if k == 3:
        price, d = rng.choice([40, 60, 75, 120, 250]), rng.choice([10, 15, 20, 25, 40])
        return (f"A jacket costs ${price} and is on sale for {d}% off. What is the sale price?",
                f"The discount is {d}% of ${price} = ${fmt_num(price * d / 100)}.\nSale price: ${price} − ${fmt_num(price * d / 100)} = **${fmt_num(price * (100 - d) / 100)}**.",
                (price, d))
    w, h = rng.randint(3, 25), rng.randint(2, 12)
    return (f"A rectangular garden is {w} m long and {h} m wide. What are its area and perimeter?",
            f"Area = length × width = {w} × {h} = **{w * h} m²**.\nPerimeter = 2 × (length + width) = 2 × ({w} + {h}) = **{2 * (w + h)} m**.",
            (w, h))


# ---------------------------------------------------------------- alpaca (zh)
TOPIC_NAMES_ZH = {"tea": "茶", "garden": "在家种菜", "cycling": "骑车出行", "weather": "节气与天气", "library": "公共图书馆",
                  "cooking": "家常菜", "coding": "写代码的好习惯", "travel": "一次小镇旅行", "health": "健康作息",
                  "astronomy": "仰望星空", "recycling": "垃圾分类", "study": "学习方法", "festival": "传统节日"}


def notice_fields(rng):
    ctx = ctx_zh(rng)
    m, d = rng.randint(1, 12), rng.randint(1, 28)
    hour = rng.choice(["上午九点", "上午十点", "下午两点", "下午三点", "晚上七点"])
    place = rng.choice([f"{ctx['town']}文化站", f"{ctx['street']}社区活动室", "镇图书馆二楼", "村委会会议室", f"{ctx['river']}老桥头"])
    event = rng.choice(["防诈骗知识讲座", "垃圾分类宣传活动", "老年人智能手机使用培训", "春季义务植树", "亲子阅读会", "消防安全演练"])
    extra = rng.choice(["请提前十分钟到场", "现场提供茶水", "名额有限，请提前报名", "请携带身份证", "雨天活动照常进行"])
    return m, d, hour, place, event, extra


def gen_alpaca_zh(rng):
    recs = []
    inst_concept = ["{q}", "请回答：{q}", "{q}请用简单的话说明。"]
    for q, a in SZ.CONCEPTS:
        recs.append({"instruction": rng.choice(inst_concept).format(q=q), "input": "", "output": a})
    inst_tr = ["把下面的句子翻译成英文。", "请将以下中文翻译为英语：", "翻译成英文："]
    inst_tr2 = ["把下面的英文翻译成中文。", "请将以下英文句子译成中文。"]
    for zh, en in SZ.TRANSLATE:
        if rng.random() < 0.65:
            recs.append({"instruction": rng.choice(inst_tr), "input": zh, "output": en})
        else:
            recs.append({"instruction": rng.choice(inst_tr2), "input": en, "output": zh})
    inst_sent = ["判断下面这条评论的情感倾向（正面、负面或中性）。", "请对以下用户评价做情感分类，只回答正面、负面或中性。"]
    for text, lab in SZ.REVIEWS:
        out = lab if rng.random() < 0.5 else {
            "正面": "正面。评论中表达了对产品或服务的满意。",
            "负面": "负面。评论中主要表达了不满和失望。",
            "中性": "中性。评论既提到了优点也提到了不足，或者只是客观描述。"}[lab]
        recs.append({"instruction": rng.choice(inst_sent), "input": text, "output": out})
    for topic in sorted(SZ.TIPS):
        for _ in range(3):
            tips = SZ.TIPS[topic]
            n = rng.randint(3, len(tips))
            pick = rng.sample(tips, n)
            inst = rng.choice([f"给出{n}条关于{topic}的建议。", f"关于{topic}，你有什么建议？", f"请列出{topic}的几个要点。"])
            head = rng.choice(["", f"以下是关于{topic}的几点建议：\n", "可以参考下面几点：\n"])
            tail = rng.choice(["", "\n坚持下去，效果会越来越明显。", "\n可以先从其中一两条做起。"])
            rec = {"instruction": inst, "input": "", "output": head + "\n".join(f"{i + 1}. {t}" for i, t in enumerate(pick)) + tail}
            if rec not in recs:
                recs.append(rec)
    for q, a in SZ.POEMS:
        recs.append({"instruction": q, "input": "", "output": a})
    for _ in range(54):
        q, a = math_zh(rng)
        if rng.random() < 0.4:
            recs.append({"instruction": "解答下面的数学题，写出计算过程。", "input": q, "output": a})
        else:
            recs.append({"instruction": q, "input": "", "output": a})
    for _ in range(16):
        k = rng.randrange(3)
        if k == 0:
            x = rng.randint(2, 95) * 100 + rng.choice([0, 50])
            recs.append({"instruction": f"{x}米等于多少千米？", "input": "", "output": f"1 千米 = 1000 米，所以 {x} 米 = {x} ÷ 1000 = {fmt_num(x / 1000)} 千米。"})
        elif k == 1:
            x = rng.choice([1.5, 2, 2.5, 3.2, 4, 0.8, 6.5])
            recs.append({"instruction": f"{fmt_num(x)}千克是多少克？", "input": "", "output": f"1 千克 = 1000 克，{fmt_num(x)} × 1000 = {fmt_num(x * 1000)} 克。"})
        else:
            x = rng.randint(70, 400)
            recs.append({"instruction": f"{x}分钟是几小时几分钟？", "input": "", "output": f"{x} ÷ 60 = {x // 60} 余 {x % 60}，所以 {x} 分钟是 {x // 60} 小时 {x % 60} 分钟。"})
    for _ in range(8):
        xs = rng.sample(range(1, 200), rng.randint(5, 9))
        asc = rng.random() < 0.6
        recs.append({"instruction": "把下面的数字按从小到大的顺序排列。" if asc else "把下面这组数按从大到小排序。",
                     "input": "，".join(map(str, xs)), "output": "，".join(map(str, sorted(xs, reverse=not asc)))})
    for _ in range(12):
        m, d, hour, place, event, extra = notice_fields(rng)
        inp = f"时间：{m}月{d}日{hour}\n地点：{place}\n事项：{event}\n备注：{extra}"
        out = (f"通知\n各位居民：\n为丰富大家的生活、增强安全意识，定于{m}月{d}日{hour}在{place}举办{event}。{extra}。\n"
               f"欢迎大家积极参加！\n社区居委会")
        recs.append({"instruction": rng.choice(["根据以下信息写一则简短的通知。", "请根据下面的要点拟一份活动通知。"]), "input": inp, "output": out})
    for _ in range(12):
        m, d, hour, place, event, extra = notice_fields(rng)
        text = f"各位居民：定于{m}月{d}日{hour}在{place}举办{event}，{extra}。欢迎大家参加。"
        recs.append({"instruction": "从下面的通知中提取活动的时间、地点和内容。", "input": text,
                     "output": f"时间：{m}月{d}日{hour}\n地点：{place}\n内容：{event}"})
    topics = sorted(Z.TOPICS)
    rng.shuffle(topics)
    for t in topics:
        recs.append({"instruction": rng.choice([f"以“{TOPIC_NAMES_ZH[t]}”为题，写一段短文。", f"写一篇关于{TOPIC_NAMES_ZH[t]}的短文，三百字左右。"]),
                     "input": "", "output": zh_essay(rng, t, n_body=rng.randint(5, len(Z.TOPICS[t]["body"])))})
    for _ in range(6):
        n = rng.randint(2, 120)
        prime = n > 1 and all(n % p for p in range(2, int(n ** 0.5) + 1))
        if prime:
            out = f"{n} 是质数。它只能被 1 和它本身整除。"
        else:
            f = next(p for p in range(2, n + 1) if n % p == 0)
            out = f"{n} 不是质数，因为它可以被 {f} 整除（{n} = {f} × {n // f}）。"
        recs.append({"instruction": f"{n} 是质数吗？", "input": "", "output": out})
    # de-duplicate while keeping order, then shuffle deterministically
    seen, uniq = set(), []
    for r in recs:
        key = json.dumps(r, ensure_ascii=False, sort_keys=True)
        if key not in seen:
            seen.add(key)
            uniq.append(r)
    rng.shuffle(uniq)
    return uniq[:200]


# ---------------------------------------------------------------- English conversations
def conv_concept(rng):
    q, a, fq, fa = rng.choice(SE.CONCEPTS)
    turns = [(q, a)]
    if rng.random() < 0.7:
        turns.append((fq, fa))
    return turns


def conv_code(rng):
    q, a, fq, fa = rng.choice(SE.CODE)
    turns = [(q, a)]
    if rng.random() < 0.6:
        turns.append((fq, fa))
    return turns


def conv_math(rng):
    q, a, _ = math_en(rng)
    turns = [(q, a)]
    if rng.random() < 0.5:
        q2, a2, _ = math_en(rng)
        turns.append(("Here's another one. " + q2, a2))
    return turns


def conv_recipe(rng):
    dish, ing, mins = rng.choice(SE.DISHES)
    serves = rng.choice([2, 4])
    q = rng.choice([f"Can you give me a simple recipe for {dish}?", f"How do I make {dish} for {serves} people?",
                    f"I'd like to cook {dish} tonight. What do I need and how long does it take?"])
    lines = [f"Here's a straightforward {dish} for {serves}, ready in about {mins} minutes.", "", "**Ingredients**"]
    lines += [f"- {i}" for i in ing]
    lines += ["", "**Method**",
              f"1. Prepare everything first: chop the vegetables and measure out the {ing[-1]}.",
              f"2. Heat a little oil in a large pan and cook the {ing[0]} over a medium-high heat until lightly browned.",
              f"3. Add the {ing[1]} and {ing[2]} and cook for a few minutes, stirring often.",
              f"4. Add the remaining ingredients and simmer until everything is cooked through, about {max(5, mins - 15)} minutes.",
              "5. Taste, adjust the seasoning and serve straight away."]
    turns = [(q, "\n".join(lines))]
    meat = [i for i in ing if i in SE.VEG_SUBS]
    if meat and rng.random() < 0.7:
        subs = "\n".join(f"- Replace the {m} with {SE.VEG_SUBS[m]}." for m in meat)
        turns.append(("Could I make it vegetarian?",
                      f"Yes, with a couple of swaps:\n{subs}\nCooking times stay roughly the same, though plant-based swaps need less time to cook through, so add them a little later."))
    if rng.random() < 0.4:
        turns.append(("How long will leftovers keep?",
                      "Cool the leftovers quickly, cover them and keep them in the fridge for up to three days. Reheat until piping hot all the way through, and only reheat once."))
    return turns


def conv_travel(rng):
    city, spots = rng.choice(SE.CITIES)
    days = rng.randint(2, 4)
    q = rng.choice([f"I have {days} days in {city}. Can you suggest a plan?", f"Plan a {days}-day trip to {city} for me, please.",
                    f"What should I do with {days} days in {city}? I like walking and food."])
    pick = rng.sample(spots, min(len(spots), days * 2))
    lines = [f"Here's a relaxed {days}-day plan for {city} that mixes sightseeing with time to wander:", ""]
    for d in range(days):
        lines.append(f"**Day {d + 1}**")
        lines.append(f"- Morning: {pick[2 * d]}." if 2 * d < len(pick) else "- Morning: a slow start and a free morning to explore your own neighbourhood.")
        if 2 * d + 1 < len(pick):
            lines.append(f"- Afternoon: {pick[2 * d + 1]}.")
        lines.append(rng.choice(["- Evening: a simple dinner near your accommodation.", "- Evening: find a busy local restaurant and try the regional dishes.",
                                 "- Evening: an early night, since tomorrow starts early."]))
        lines.append("")
    lines.append("Leave some gaps in the plan; the best moments often come from unplanned detours.")
    turns = [(q, "\n".join(lines).strip())]
    if rng.random() < 0.6:
        turns.append(("What if it rains?",
                      f"Swap the outdoor items for indoor ones: museums, covered markets and cafés are all good options in {city}. Keep the walks for the drier half of the day, and carry a light waterproof so a short shower doesn't derail everything."))
    return turns


def conv_email(rng):
    who, situation, goal = rng.choice(SE.EMAIL_SITUATIONS)
    name = rng.choice(E.NAMES)
    q = f"Write a short email to {who}: {situation}. I want to {goal}."
    greet = {"my landlord": "Dear landlord", "my manager": "Hi", "a colleague": "Hi", "the school": "Dear school office",
             "a customer": "Dear customer", "my neighbour": "Hi neighbour", "the library": "Hello",
             "a conference organiser": "Dear organisers"}[who]
    body = f"{greet},\n\nI'm writing because {situation.replace('my ', 'my ').replace('I ', 'I ')}. I would like to {goal}.\n\n"
    body += rng.choice(["Please let me know what works best for you.", "Thank you in advance for your help.", "I appreciate your understanding."])
    body += f"\n\nBest regards,\n{name}"
    turns = [(q, body)]
    if rng.random() < 0.5:
        turns.append(("Can you make it a bit shorter?",
                      f"{greet},\n\nJust a quick note: {situation}. I'd like to {goal}.\n\nThanks,\n{name}"))
    return turns


def system_for(kind):
    generic = [SE.SYSTEM[0], SE.SYSTEM[5]]
    specific = {"conv_concept": [SE.SYSTEM[1]], "conv_code": [SE.SYSTEM[2]], "conv_math": [SE.SYSTEM[1]],
                "conv_recipe": [SE.SYSTEM[3]], "conv_travel": [SE.SYSTEM[4]]}.get(kind, [])
    return generic + specific


def gen_sharegpt_en(rng):
    gens = [conv_concept] * 3 + [conv_code] * 3 + [conv_math] * 2 + [conv_recipe] * 2 + [conv_travel] * 2 + [conv_email] * 2
    out, seen = [], set()
    while len(out) < 200:
        g = rng.choice(gens)
        turns = g(rng)
        # sometimes chain a second topic or a thank-you, keeping 1..4 turns
        if len(turns) < 3 and rng.random() < 0.3:
            turns += rng.choice(gens)(rng)[:1]
        if len(turns) < 4 and rng.random() < 0.2:
            turns.append(rng.choice(SE.FOLLOWUPS_GENERIC))
        turns = turns[:4]
        conv = []
        if rng.random() < 0.35:
            conv.append({"from": "system", "value": rng.choice(system_for(g.__name__))})
        for u, a in turns:
            conv.append({"from": "human", "value": u})
            conv.append({"from": "gpt", "value": a})
        key = json.dumps(conv, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        out.append({"conversations": conv})
    return out


# ---------------------------------------------------------------- mixed messages
def zh_turn(rng):
    k = rng.randrange(6)
    if k == 0:
        q, a = rng.choice(SZ.CONCEPTS)
        return q, a
    if k == 1:
        zh, en = rng.choice(SZ.TRANSLATE)
        return (f"“{zh}”用英语怎么说？", f"可以翻译为：{en}") if rng.random() < 0.5 else \
            (f"How do you say \"{en}\" in Chinese?", f"In Chinese: {zh}")
    if k == 2:
        return math_zh(rng)
    if k == 3:
        topic = rng.choice(sorted(SZ.TIPS))
        pick = rng.sample(SZ.TIPS[topic], 3)
        return f"关于{topic}，能给我三条建议吗？", "\n".join(f"{i + 1}. {t}" for i, t in enumerate(pick))
    if k == 4:
        t = rng.choice(sorted(Z.TOPICS))
        return f"帮我写一小段关于{TOPIC_NAMES_ZH[t]}的文字。", zh_essay(rng, t, n_body=rng.randint(3, 6), paragraphs=False)
    text, lab = rng.choice(SZ.REVIEWS)
    return f"这条评论是正面还是负面的？“{text}”", f"{lab}。"


def en_turn(rng):
    k = rng.randrange(4)
    if k == 0:
        q, a, _, _ = rng.choice(SE.CONCEPTS)
        return q, a
    if k == 1:
        q, a, _, _ = rng.choice(SE.CODE)
        return q, a
    if k == 2:
        q, a, _ = math_en(rng)
        return q, a
    return rng.choice(conv_travel(rng) + conv_email(rng))


def mixed_turn(rng):
    # Chinese question about code, or English question about Chinese text
    k = rng.randrange(3)
    if k == 0:
        q, a, _, _ = rng.choice(SE.CODE)
        return "请用英文回答：" + q, a
    if k == 1:
        t = rng.choice(sorted(Z.TOPICS))
        essay = zh_essay(rng, t, n_body=rng.randint(2, 4), paragraphs=False)
        n_chars = len(essay)
        return f"How many characters are in this Chinese text (counting punctuation)?\n\n{essay}", f"The text has {n_chars} characters, including punctuation."
    zh, en = rng.choice(SZ.TRANSLATE)
    return f"Translate into Chinese: {en}", zh


def gen_messages_mixed(rng):
    out, seen = [], set()
    while len(out) < 200:
        lang = rng.choice(["zh", "zh", "en", "en", "mixed"])
        n = rng.choice([1, 1, 2, 2, 3])
        msgs = []
        if rng.random() < 0.4:
            msgs.append({"role": "system", "content": rng.choice(SZ.SYSTEM if lang == "zh" else system_for(""))})
        for _ in range(n):
            f = {"zh": zh_turn, "en": en_turn, "mixed": rng.choice([zh_turn, en_turn, mixed_turn])}[lang]
            u, a = f(rng)
            msgs.append({"role": "user", "content": u})
            msgs.append({"role": "assistant", "content": a})
        key = json.dumps(msgs, sort_keys=True, ensure_ascii=False)
        if key in seen:
            continue
        seen.add(key)
        out.append({"messages": msgs})
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    en = gen_pretrain_en(random.Random(101))
    assert all("\n" not in d for d in en)
    with open(os.path.join(OUT, "pretrain_en.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(en) + "\n")
    zh = gen_pretrain_zh(random.Random(202))
    with open(os.path.join(OUT, "pretrain_zh.jsonl"), "w", encoding="utf-8") as f:
        for d in zh:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    al = gen_alpaca_zh(random.Random(303))
    with open(os.path.join(OUT, "alpaca_zh.json"), "w", encoding="utf-8") as f:
        json.dump(al, f, ensure_ascii=False, indent=1)
        f.write("\n")
    sg = gen_sharegpt_en(random.Random(404))
    with open(os.path.join(OUT, "sharegpt_en.jsonl"), "w", encoding="utf-8") as f:
        for r in sg:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    mm = gen_messages_mixed(random.Random(505))
    with open(os.path.join(OUT, "messages_mixed.jsonl"), "w", encoding="utf-8") as f:
        for r in mm:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(len(en), len(zh), len(al), len(sg), len(mm))


if __name__ == "__main__":
    main()
