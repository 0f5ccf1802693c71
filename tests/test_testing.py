"""The random-weight test pipelines: the byte-level tokenizer really is byte level (the transformers 5
trap: keyword vocab paths are ignored and give a 2-token tokenizer)."""

from transformers import CLIPTokenizer

from nfsd_nerf.testing import write_byte_level_clip_vocab


def test_byte_level_vocab_tokenizes_any_text_and_merges_listed_words(tmp_path):
    vocab, merges = write_byte_level_clip_vocab(tmp_path, ["hamburger"])
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=77)
    assert len(tokenizer) >= 514
    ids = tokenizer("a hamburger!").input_ids
    assert ids[0] == 512 and ids[-1] == 513  # BOS, EOS
    assert len(ids) == 2 + 1 + 1 + 1  # "a", "hamburger" (merged), "!"
    assert len(tokenizer("zq").input_ids) == 2 + 2  # unknown words fall back to one token per byte


def test_tiny_pipeline_folder_has_every_component(tiny_sd_path):
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_sd_path / part).is_dir()
