"""Our ragged forward over the blocked cache must equal transformers' logits (fp32)."""
import pytest
import torch

from splitfuse.compiled.batch import Batch
from splitfuse.compiled.loader import HUGE_PAGE, load_model, resolve_dtype, resolve_model_dir
from splitfuse.compiled.runner import ModelRunner, SequenceChunk

BLOCK = 16
PROMPT_LENS = [5, 17, 33, 48]


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


def make_runner(path, max_seqs: int = 8) -> ModelRunner:
    model = load_model(path, torch.float32, torch.device("cpu"))
    return ModelRunner(model, num_blocks=64, block_size=BLOCK, max_num_seqs=max_seqs, max_model_len=256,
                       buckets=[64, 256], compile=False)


def tables(n_seqs: int, max_len: int) -> list[list[int]]:
    """Disjoint, deliberately non-contiguous block tables (reverse order)."""
    per = -(-max_len // BLOCK)
    return [list(range(63 - i * per, 63 - (i + 1) * per, -1)) for i in range(n_seqs)]


def test_whole_prompts_all_positions(tiny_model):
    family, path, hf = tiny_model
    runner = make_runner(path)
    ps = prompts(hf.config.vocab_size)
    bts = tables(len(ps), 64)
    ids, pos, slots, qsl, rows = [], [], [], [0], []
    for p, bt in zip(ps, bts):
        for i, tok in enumerate(p):
            ids.append(tok)
            pos.append(i)
            slots.append(bt[i // BLOCK] * BLOCK + i % BLOCK)
        qsl.append(len(ids))
    block_tables = torch.tensor([bt + [0] * (16 - len(bt)) for bt in bts], dtype=torch.int32)
    batch = Batch(input_ids=torch.tensor(ids), positions=torch.tensor(pos), slot_mapping=torch.tensor(slots),
                  query_start_loc=torch.tensor(qsl, dtype=torch.int32),
                  seq_lens=torch.tensor(PROMPT_LENS, dtype=torch.int32), block_tables=block_tables,
                  logits_indices=torch.arange(len(ids)))
    with torch.no_grad():
        ours = runner.model.lm_head(runner.model(batch, runner.kv_cache))
    expected = torch.cat([hf_logits(hf, p) for p in ps])
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_prompts_through_cache(tiny_model, chunk):
    family, path, hf = tiny_model
    runner = make_runner(path)
    ps = prompts(hf.config.vocab_size)
    bts = tables(len(ps), 64)
    done = [0] * len(ps)
    got: list[list[torch.Tensor]] = [[] for _ in ps]
    while any(d < len(p) for d, p in zip(done, ps)):
        live = [i for i, p in enumerate(ps) if done[i] < len(p)]
        chunks = [SequenceChunk(ps[i][done[i]:done[i] + chunk], done[i], bts[i], True) for i in live]
        logits = runner.execute(chunks)
        for i, c, row in zip(live, chunks, logits):
            done[i] += len(c.token_ids)
            got[i].append((done[i] - 1, row))
    for p, rows in zip(ps, got):
        expected = hf_logits(hf, p)
        for position, row in rows:
            torch.testing.assert_close(row, expected[position], atol=2e-4, rtol=1e-4)


def test_mixed_decode_and_prompt_batch(tiny_model):
    """Some sequences decode one token while others are mid-prompt, all in one pass."""
    family, path, hf = tiny_model
    runner = make_runner(path)
    ps = prompts(hf.config.vocab_size)
    bts = tables(len(ps), 64)
    # Sequences 0 and 1 prefill all but their last token; 2 and 3 prefill a first part.
    first = [len(ps[0]) - 1, len(ps[1]) - 1, 10, 20]
    runner.execute([SequenceChunk(p[:n], 0, bt, False) for p, n, bt in zip(ps, first, bts)])
    mixed = [SequenceChunk([ps[0][-1]], first[0], bts[0], True),
             SequenceChunk(ps[2][10:], 10, bts[2], True),
             SequenceChunk([ps[1][-1]], first[1], bts[1], True),
             SequenceChunk(ps[3][20:40], 20, bts[3], True)]
    logits = runner.execute(mixed)
    for row, (i, position) in zip(logits, [(0, len(ps[0]) - 1), (2, len(ps[2]) - 1), (1, len(ps[1]) - 1), (3, 39)]):
        torch.testing.assert_close(row, hf_logits(hf, ps[i])[position], atol=2e-4, rtol=1e-4)


def test_missing_path_and_unknown_architecture(tmp_path):
    with pytest.raises(ValueError, match="not a local Hugging Face directory"):
        resolve_model_dir(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="supported"):
        load_model(tmp_path, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2"])
def test_tied_embeddings_are_one_parameter(make_checkpoint, family):
    """A tied lm_head is the embedding's Parameter itself, so moving the model copies it once."""
    model = load_model(make_checkpoint(family), torch.float32, torch.device("cpu"))
    embed = (model.model.decoder if family == "opt" else model.model).embed_tokens
    tied = family != "qwen2"  # the tiny Qwen2 keeps the transformers default: untied
    assert (model.lm_head.weight is embed.weight) == tied
    model.to(torch.float64)  # a move that copies
    assert (model.lm_head.weight is embed.weight) == tied
    assert model.lm_head.weight.dtype == torch.float64


def test_packed_weights_share_one_mapping_from_a_huge_page_boundary(make_checkpoint):
    """Every packed weight in one mapping advised for huge pages (the kernel decides whether it gets them),
    each at a 64-byte boundary, the first at a 2 MB one; the packs' own tests and the models' comparisons
    with transformers check what is in them."""
    model = load_model(make_checkpoint("llama"), torch.float32, torch.device("cpu"))
    packs = [m.packed for m in model.modules() if getattr(m, "packed", None) is not None]
    assert len(packs) > 1 and len({p.untyped_storage().data_ptr() for p in packs}) == 1
    assert all(p.data_ptr() % 64 == 0 for p in packs) and min(p.data_ptr() for p in packs) % HUGE_PAGE == 0


def test_auto_dtype_on_cuda_wants_native_bf16(monkeypatch):
    # V100 and T4 emulate bf16, which the Triton kernel's tl.dot cannot use: fp16 there.
    monkeypatch.delenv("SPLITFUSE_AUTO_DTYPE", raising=False)  # `make test-bf16` names what auto means
    for native, expected in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, native=native: native or including_emulation)
        assert resolve_dtype("auto", torch.device("cuda")) == expected


def test_auto_dtype_can_be_named_for_the_whole_run(monkeypatch):
    """`make test-bf16`: SPLITFUSE_AUTO_DTYPE decides what "auto" means; a dtype asked for by name stays."""
    monkeypatch.delenv("SPLITFUSE_AUTO_DTYPE", raising=False)
    native = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == native
    monkeypatch.setenv("SPLITFUSE_AUTO_DTYPE", "bfloat16")
    assert resolve_dtype("auto", torch.device("cpu")) == resolve_dtype(None, torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32
    monkeypatch.setenv("SPLITFUSE_AUTO_DTYPE", "float64")
    with pytest.raises(ValueError, match="unknown dtype 'float64'"):
        resolve_dtype("auto", torch.device("cpu"))
