import pytest
from test_matrix import media, job_tmp, server, plain, run, differences, ITEMS  # noqa: F401

EXTRA = [dict(media=m, sp_size=sp, chunking=c, dit_offload=o, vae_tiling=False, delivery="base64")
         for m in ("list",) for sp in (2,) for c in ("whole", "chunked") for o in (False, True)]


@pytest.mark.parametrize("row", EXTRA * 2)
def test_extra(server, media, plain, tmp_path, row):
    _, decoded = run(server, row, media, tmp_path)
    for kind, frames in zip(ITEMS[row["media"]], decoded):
        print(row, kind, differences(frames, plain[kind, row["chunking"]]))
