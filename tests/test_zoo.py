"""Model zoo and tokenizer: tiny is seeded and offline, folders round-trip, the hub fails fast."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import is_offline_mode
from transformers import CLIPTokenizer

from suradapter.model.specs import builtin_corpus
from suradapter.model.tokenizer import bytes_to_unicode, learn_bpe_merges, write_clip_tokenizer
from suradapter.model.zoo import BaseModelNotFoundError, load_base_pipeline


def test_tiny_is_seeded(tiny_pipeline):
    again = load_base_pipeline("tiny", seed=0)
    other = load_base_pipeline("tiny", seed=1)
    pairs = zip(tiny_pipeline.unet.parameters(), again.unet.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not torch.equal(
        tiny_pipeline.text_encoder.get_input_embeddings().weight,
        other.text_encoder.get_input_embeddings().weight,
    )


def test_tiny_components_are_frozen(tiny_pipeline):
    for module in (tiny_pipeline.text_encoder, tiny_pipeline.unet, tiny_pipeline.vae):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


def test_tiny_tokenizer_is_a_real_clip_bpe(tiny_pipeline):
    tokenizer = tiny_pipeline.tokenizer
    assert isinstance(tokenizer, CLIPTokenizer)
    assert tokenizer.vocab_size > 512  # bytes, bytes + </w>, and learned merges
    ids = tokenizer("Three RED circles").input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["<|startoftext|>", "three</w>", "red</w>", "circles</w>", "<|endoftext|>"]
    unseen = tokenizer.convert_ids_to_tokens(tokenizer("zxq").input_ids)[1:-1]
    assert unseen and tokenizer.eos_token not in unseen and "".join(unseen) == "zxq</w>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.model_max_length == tiny_pipeline.text_encoder.config.max_position_embeddings


MERGES_DIGEST = (
    "import hashlib, json; from suradapter.model.specs import builtin_corpus; "
    "from suradapter.model.tokenizer import learn_bpe_merges; "
    "print(hashlib.sha256(json.dumps(learn_bpe_merges(builtin_corpus('tiny'), 400, 1)).encode())"
    ".hexdigest())"
)


def test_merges_are_identical_in_every_process():
    """Hash-order tie-breaking would give each process its own vocabulary (and model)."""
    import subprocess
    import sys

    digests = {
        subprocess.run(
            [sys.executable, "-c", MERGES_DIGEST], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    }
    assert len(digests) == 1


def test_clip_layout(tmp_path):
    corpus = builtin_corpus("tiny")
    merges = learn_bpe_merges(corpus, 50, min_frequency=1)
    folder = write_clip_tokenizer(merges, tmp_path, model_max_length=16)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    symbols = list(bytes_to_unicode().values())
    vocab = tokenizer.get_vocab()
    assert [vocab[s] for s in symbols[:3]] == [0, 1, 2]
    assert vocab[symbols[0] + "</w>"] == 256
    assert (tmp_path / "merges.txt").read_text().startswith("#version: 0.2\n")


def test_local_folder_round_trip(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "base")
    loaded = load_base_pipeline(str(tmp_path / "base"))
    assert loaded.tokenizer.vocab_size == tiny_pipeline.tokenizer.vocab_size
    pairs = zip(tiny_pipeline.unet.parameters(), loaded.unet.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(BaseModelNotFoundError, match=r"no model_index\.json"):
        load_base_pipeline(str(tmp_path))


def test_hub_id_offline_fails_at_once_saying_what_to_set():
    assert is_offline_mode()  # conftest sets HF_HUB_OFFLINE before huggingface_hub loads
    with pytest.raises(BaseModelNotFoundError) as err:
        load_base_pipeline("someone/not-a-cached-model")
    message = str(err.value)
    assert "offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)" in message
    assert "base_model.id" in message and "local diffusers folder" in message
