from transformers import CLIPTokenizer

from slimsd.tokenizer import WORDS, build_clip_tokenizer


def test_grammar_words_are_single_tokens_and_anything_tokenizes(tmp_path):
    build_clip_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)  # reloads as the pipeline does
    for w in WORDS:
        ids = tok(w).input_ids
        assert len(ids) == 3, (w, tok.convert_ids_to_tokens(ids))  # bos, word, eos
    ids = tok("a zebra on the moon!").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]  # bytes fallback, not <unk>
    padded = tok("a red circle", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 77
    assert (tmp_path / "vocab.json").exists() and (tmp_path / "merges.txt").exists()


def test_build_is_deterministic(tmp_path):
    # the tokenizers BPE trainer broke ties in hash-map order: two builds gave different ids
    a, b = tmp_path / "a", tmp_path / "b"
    build_clip_tokenizer(a)
    build_clip_tokenizer(b)
    for f in ("vocab.json", "merges.txt"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_learn_bpe_matches_a_hand_computation():
    from slimsd.tokenizer import learn_bpe

    # spelled out: "ab" -> [a, b</w>], "abc" -> [a, b, c</w>]; every pair occurs once, so the
    # string order decides: (a, b) first, giving [a, b</w>], [ab, c</w>]; then (a, b</w>), (ab, c</w>)
    merges = learn_bpe(["abc", "ab"])
    assert merges == [("a", "b"), ("a", "b</w>"), ("ab", "c</w>")]
