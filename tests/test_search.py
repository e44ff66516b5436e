"""`mls search`: exact neighbours as a brute-force loop finds them, in torch by blocks and in FAISS, the table and
its --min-cosine cut on a hand-made collection, and bad input in one line."""
import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mls.cli import console
from mls.embedding import knn
from mls.embedding.settings import SearchSettings
from mls.embedding.similar import search_embeddings


def brute_force(queries: np.ndarray, base: np.ndarray, k: int, exclude=None) -> tuple[np.ndarray, np.ndarray]:
    """Each query against every row, one cosine at a time, then sorted: the slow, obvious way."""
    sims, rows = [], []
    for q, query in enumerate(queries):
        scored = []
        for r, row in enumerate(base):
            if exclude is not None and exclude[q] == r:
                continue
            scored.append((float(np.dot(query, row) / np.linalg.norm(query) / np.linalg.norm(row)), r))
        scored.sort(key=lambda s: -s[0])
        sims.append([s for s, _ in scored[:k]])
        rows.append([r for _, r in scored[:k]])
    return np.array(sims), np.array(rows)


def vectors(n: int, d: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 3  # not normalised


@pytest.mark.parametrize("own", [False, True])
def test_torch_blocks_find_what_a_brute_force_loop_finds(monkeypatch, own):
    monkeypatch.setattr(knn, "QUERY_BLOCK", 7)  # several blocks of queries and of stored rows, uneven at the end
    monkeypatch.setattr(knn, "BASE_BLOCK", 16)
    base = vectors(70)
    queries = base[:20] if own else vectors(20, seed=1)
    exclude = torch.arange(20) if own else None
    sims, rows = knn.torch_search(queries, base, 5, exclude)
    want_sims, want_rows = brute_force(queries.numpy(), base.numpy(), 5, None if exclude is None else exclude.numpy())
    assert rows.tolist() == want_rows.tolist()
    np.testing.assert_allclose(sims.numpy(), want_sims, atol=1e-5)


def test_faiss_and_torch_agree():
    pytest.importorskip("faiss")
    base, queries = vectors(500, 32), vectors(40, 32, seed=3)
    for exclude, q in ((None, queries), (torch.arange(40), base[:40])):
        t_sims, t_rows = knn.torch_search(q, base, 8, exclude)
        f_sims, f_rows = knn.faiss_search(q, base, 8, exclude)
        assert t_rows.tolist() == f_rows.tolist()
        torch.testing.assert_close(t_sims, f_sims, atol=1e-5, rtol=0)


def test_k_larger_than_the_collection_gives_every_other_row():
    base = vectors(4)
    sims, rows = knn.torch_search(base, base, 10, torch.arange(4))
    assert rows.shape == (4, 3) and all(q not in r for q, r in enumerate(rows.tolist()))


def collection(folder, vectors: torch.Tensor, names: list[str]) -> None:
    """An `mls embed` output made by hand: the settings file, the vectors and the path table."""
    folder.mkdir()
    (folder / "embed.json").write_text(json.dumps({"weights": "random", "data": str(folder)}))
    save_file({"embeddings": vectors}, str(folder / "embeddings.safetensors"))
    (folder / "paths.csv").write_text("path,index\n" + "".join(f"{n},{i}\n" for i, n in enumerate(names)))


def test_all_against_all_with_a_cosine_floor_lists_the_duplicates(tmp_path):
    # a and a2 are the same direction up to scale (cosine 1), b and b2 at cosine 0.96; c far from all
    a, b, c = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0]), torch.tensor([0, 0, 1.0])
    b2 = torch.tensor([0, 0.96, 0.28])  # unit length, cosine 0.96 with b, 0.28 with c
    collection(tmp_path / "e", torch.stack([a, b, c, 2 * a, b2]), ["a.jpg", "b.jpg", "c.jpg", "a2.jpg", "b2.jpg"])
    for engine in ("torch", "faiss") if knn.faiss_installed() else ("torch",):
        out = tmp_path / f"dup-{engine}"
        search_embeddings(SearchSettings(embeddings=str(tmp_path / "e"), all=True, k=2, min_cosine=0.95,
                                         engine=engine, out=str(out), sheet_rows=0))
        table = (out / "neighbors.csv").read_text().splitlines()
        assert table == ["query,rank,neighbor,cosine", "a.jpg,1,a2.jpg,1.000000", "b.jpg,1,b2.jpg,0.960000",
                         "a2.jpg,1,a.jpg,1.000000", "b2.jpg,1,b.jpg,0.960000"]


def run_console(monkeypatch, capsys, *args) -> str:
    monkeypatch.setattr(sys, "argv", ["mls", *args])
    monkeypatch.delenv("MLS_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as stop:
        console()
    return stop.value.code if isinstance(stop.value.code, str) else capsys.readouterr().err.strip()


def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys):
    collection(tmp_path / "e", vectors(3), ["a.jpg", "b.jpg", "c.jpg"])
    (tmp_path / "e" / "paths.csv").write_text("path,index\na.jpg,0\nb.jpg,1\n")
    assert run_console(monkeypatch, capsys, "search", "--embeddings", str(tmp_path / "e"), "--all", "true") == (
        f"mls: error: {tmp_path / 'e' / 'embeddings.safetensors'} holds 3 embeddings but {tmp_path / 'e' / 'paths.csv'} "
        "lists 2 paths: the files are not of one run; run mls embed again into a new --out")
    (tmp_path / "e" / "paths.csv").write_text("path,index\na.jpg,0\nb.jpg,1\nc.jpg,2\n")
    (tmp_path / "q.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    message = run_console(monkeypatch, capsys, "search", "--embeddings", str(tmp_path / "e"),
                          "--query", str(tmp_path / "q.jpg"), "--out", str(tmp_path / "s"))
    assert message.startswith(f"mls: error: query image {tmp_path / 'q.jpg'} cannot be read: ") and "\n" not in message
    assert run_console(monkeypatch, capsys, "search", "--embeddings", str(tmp_path / "none"), "--all", "true") == (
        f"mls: error: embeddings folder {str(tmp_path / 'none')!r} does not exist; run mls embed --out there first")
    assert run_console(monkeypatch, capsys, "search", "--embeddings", str(tmp_path / "e")) == (
        "mls: error: give either --query IMAGE (or --query '[A, B]') or --all true")
