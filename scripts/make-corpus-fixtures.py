#!/usr/bin/env python3
"""Builds the small corpus fixtures of `did data prepare`'s tests, in the
formats researchers have their data in, from public-domain State of the Union
paragraphs of data/excerpt:

- sample.jsonl: one document per line, a `text` field (and an `id`);
- sample.parquet: a `text` and an `id` column, snappy-compressed as Hugging
  Face datasets write them, 3 rows per row group (so several groups are read);
- openwebtext-mini.tar.xz: OpenWebText's own layout, a .tar.xz of
  `openwebtext/urlsf_subset*_data.xz` files, each an xz-compressed tar of .txt
  documents.

    python3 scripts/make-corpus-fixtures.py [OUT]   (default did-cli/tests/fixtures/corpora)

Needs pyarrow for the Parquet file. The output is committed.
"""
import io
import json
import lzma
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

out = Path(sys.argv[1] if len(sys.argv) > 1 else "did-cli/tests/fixtures/corpora")
out.mkdir(parents=True, exist_ok=True)
source = sorted(Path("data/excerpt/sotu").glob("*.txt"))[0].read_text(encoding="utf-8")
sentences = [s.strip() + "." for s in source.replace("\n", " ").split(". ") if len(s.strip()) > 80]
paragraphs = [" ".join(sentences[3 * i:3 * i + 3]) for i in range(12)]
assert len(paragraphs) == 12, len(paragraphs)

with open(out / "sample.jsonl", "w", encoding="utf-8") as f:
    for i, p in enumerate(paragraphs[:6]):
        f.write(json.dumps({"id": i, "text": p}) + "\n")

table = pa.table({"id": list(range(7)), "text": paragraphs[:6] + [None]})
pq.write_table(table, out / "sample.parquet", compression="snappy", row_group_size=3)


def tar_bytes(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


subsets = []
for s in range(2):
    docs = [(f"{s:04d}{d:03d}-{d}.txt", paragraphs[6 + 3 * s + d].encode()) for d in range(3)]
    subsets.append((f"openwebtext/urlsf_subset0{s}-{s + 1}_data.xz", lzma.compress(tar_bytes(docs))))
(out / "openwebtext-mini.tar.xz").write_bytes(lzma.compress(tar_bytes(subsets)))
print("wrote", sorted(p.name for p in out.iterdir()))
