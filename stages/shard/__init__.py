"""The shard file format (DESIGN §4): its one owner - the writer, the readers and the
invariants - as Megatron's indexed_dataset.py. Everything else (the build's assembly, the
built-dir checks, the training stream's maps, `pipeline verify`) calls this package.

A shard is one HDF5 file, token ids back to back: `tokens` (token_dtype(vocab)), `offsets`
(int64, n+1), `source_record` (int64, n), optionally `loss_spans` (int32 (m, 2), [start, end)
relative to the sample's start) with `loss_span_offsets` (int64, n+1), and the provenance.
Every dataset is one contiguous, uncompressed block at a byte offset (`shard_layout`, recorded
in meta.json), so a reader may map the file and place views by offset without h5py
(`map_shard`, which holds no file descriptor). The invariants: `expected_layout_faults` (dtypes,
shapes, byte ranges against a meta.json entry: O(1)), `check_arrays` (the structure, in blocks)
and `shard_file_faults` (a file, read in blocks: memory O(block) whatever its size).

Provenance (format 2): a shard may join units of many source files. `source_files` lists
them in order and `source_file_offsets` (k+1, like `offsets`) gives each one's samples,
`[sfo[j], sfo[j+1])`; `source_record` is the record number inside that file. O(files) per
shard, not O(samples): a file's samples are consecutive because units are joined in source
order. Format 1 shards (one file, named by the `source` attribute) are read as one run.

Modules (one way: layout <- reader <- writer; layout <- checks): `layout` (names, dtypes,
byte layout), `reader`, `writer`, `checks`.
"""
from .checks import BLOCK, check_arrays, provenance_faults, shard_file_faults
from .layout import (ARRAYS, FORMAT_VERSION, INDEX_DTYPES, READABLE_FORMATS, Provenance,
                     ShardArrays, decode_files, dtype_name, expected_layout_faults, file_sha256,
                     shard_layout, token_dtype)
from .reader import (MappedArrays, map_errno_is_limit, map_shard, read_provenance, read_shard,
                     shard_provenance)
from .writer import concat_shards, write_shard

__all__ = ["ARRAYS", "BLOCK", "FORMAT_VERSION", "INDEX_DTYPES", "READABLE_FORMATS", "MappedArrays",
           "Provenance", "ShardArrays", "check_arrays", "concat_shards", "decode_files",
           "dtype_name", "expected_layout_faults", "file_sha256", "map_errno_is_limit",
           "map_shard", "provenance_faults", "read_provenance", "read_shard", "shard_file_faults",
           "shard_layout", "shard_provenance", "token_dtype", "write_shard"]
