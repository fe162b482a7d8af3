"""Synthetic corpus, tokenizer and data pipeline (`convert/`): CPU only, no network, a few seconds."""

import json
import operator
import re
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from melt_convert import synthetic
from melt_convert.data import (
    TINY_CORPUS,
    TINY_TOKENIZER,
    load_text_dataset,
    pack_sequences,
    split_holdout,
)
from melt_convert.synthetic import CorpusMix, chain_split, depth_problems, make_corpus, write_jsonl
from melt_convert.tokenizer import SPECIAL_TOKENS, build_tokenizer, training_texts

CHATML = (
    "<|im_start|>user\na=1;?a=<|im_end|>\n"
    "<|im_start|>assistant\n1<|im_end|>\n"
)
CHAT = [{"role": "user", "content": "a=1;?a="}, {"role": "assistant", "content": "1"}]
OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


# Depth task: an interpreter written independently of the generator ------------------------------


def solve(prompt: str) -> tuple[int, int]:
    """(value, depth) of the queried variable, by evaluating the assignments in order."""
    *statements, query = prompt.split(";")
    query_match = re.fullmatch(r"\?([a-z])=", query)
    assert query_match, f"bad query {query!r} in {prompt!r}"
    values: dict[str, int] = {}
    depths: dict[str, int] = {}
    for statement in statements:
        literal = re.fullmatch(r"([a-z])=(\d)", statement)
        operation = re.fullmatch(r"([a-z])=([a-z])([-+*])(\d)", statement)
        if literal:
            name, value = literal.group(1), int(literal.group(2))
            values[name], depths[name] = value, 0
        else:
            assert operation, f"bad statement {statement!r} in {prompt!r}"
            name, source, symbol, operand = operation.groups()
            assert source in values, f"{source} used before assignment in {prompt!r}"
            assert name not in values, f"{name} assigned twice in {prompt!r}"
            values[name] = OPERATORS[symbol](values[source], int(operand)) % 10
            depths[name] = depths[source] + 1
    name = query_match.group(1)
    return values[name], depths[name]


def chain_key(prompt: str) -> tuple:
    """The queried computation without names or distractors: (start value, ((op, operand), ...))."""
    *statements, query = prompt.split(";")
    definitions = dict(statement.split("=", 1) for statement in statements)
    name, hops = query[1], []
    while not definitions[name].isdigit():
        source, symbol, operand = definitions[name]
        hops.append((symbol, int(operand)))
        name = source
    return int(definitions[name]), tuple(reversed(hops))


def corpus_problems(records) -> list[str]:
    """Every depth-problem prompt in corpus records (text lines and chat user turns)."""
    prompts = []
    for record in records:
        if "messages" in record:
            prompts.append(record["messages"][0]["content"])
        else:
            prompts += [line[:-1] for line in record["text"].split("\n") if ";?" in line]
    return [prompt for prompt in prompts if ";?" in prompt]


def test_depth_problems_are_solved_correctly():
    problems = depth_problems(600, seed=0, split="test") + depth_problems(600, seed=0, split="train")
    for problem in problems:
        value, depth = solve(problem.prompt)
        assert problem.answer == str(value), problem
        assert problem.depth == depth, problem
        assert problem.text == problem.prompt + problem.answer
        assert problem.to_messages() == [
            {"role": "user", "content": problem.prompt},
            {"role": "assistant", "content": problem.answer},
        ]
    assert Counter(problem.depth for problem in problems) == {depth: 200 for depth in range(1, 7)}
    assert set(Counter(problem.answer for problem in problems)) == set("0123456789")


def test_depth_problems_are_deterministic_and_respect_settings():
    assert depth_problems(50, seed=1, split="test") == depth_problems(50, seed=1, split="test")
    assert depth_problems(50, seed=1, split="test") != depth_problems(50, seed=2, split="test")
    problems = depth_problems(60, seed=0, depths=(5, 6), split="test", distractors=(0, 0))
    assert {problem.depth for problem in problems} == {5, 6}
    # Without distractors every statement is on the chain: depth + 1 of them.
    assert all(problem.prompt.count(";") == problem.depth + 1 for problem in problems)


def test_train_and_test_splits_are_disjoint():
    test_chains = {chain_key(p.prompt) for p in depth_problems(3000, seed=0, split="test")}
    train_chains = {chain_key(p.prompt) for p in depth_problems(3000, seed=0, split="train")}
    corpus_chains = {chain_key(prompt) for prompt in corpus_problems(make_corpus(400, seed=0))}
    assert len(test_chains) > 1000 and len(corpus_chains) > 500
    assert not test_chains & train_chains
    assert not test_chains & corpus_chains
    assert {chain_split(*chain) for chain in test_chains} == {"test"}
    assert {chain_split(*chain) for chain in train_chains | corpus_chains} == {"train"}


def expression_chain(prompt: str) -> tuple:
    """(start value, ((op, operand), ...)) of an expression-form prompt such as ``3+4*3=``."""
    assert prompt.endswith("=") and len(prompt) % 2 == 0, prompt
    body = prompt[:-1]
    return int(body[0]), tuple((body[i], int(body[i + 1])) for i in range(1, len(body), 2))


def test_expression_form_evaluates_left_to_right_on_the_same_split():
    problems = depth_problems(600, seed=0, depths=(1, 2, 3), split="test", form="expression")
    for problem in problems:
        start, hops = expression_chain(problem.prompt)
        value = start
        for symbol, operand in hops:
            value = {"+": value + operand, "-": value - operand, "*": value * operand}[symbol] % 10
        assert problem.answer == str(value) and problem.depth == len(hops), problem
        assert chain_split(start, hops) == "test"
    assert Counter(problem.depth for problem in problems) == {1: 200, 2: 200, 3: 200}
    # Hand-checked: ((3 + 4) * 3 - 5) mod 10 = 6.
    assert ((3 + 4) * 3 - 5) % 10 == 6 and expression_chain("3+4*3-5=") == (3, (("+", 4), ("*", 3), ("-", 5)))
    records = make_corpus(300, seed=0, mix=CorpusMix(depths=(1, 2), form="expression"))
    lines = [line for r in records if "text" in r for line in r["text"].split("\n") if line[:1].isdigit()]
    lines += [r["messages"][0]["content"] + r["messages"][1]["content"] for r in records if "messages" in r
              and r["messages"][0]["content"][:1].isdigit()]
    chains = {expression_chain(line[:-1]) for line in lines}
    assert len(chains) > 100 and {len(hops) for _, hops in chains} == {1, 2}
    assert {chain_split(*chain) for chain in chains} == {"train"}
    # A chain is drawn before anything form-specific (names, distractors), so the first problem of a seed
    # is the same computation in both forms.
    named, bare = depth_problems(1, seed=3, split="test"), depth_problems(1, seed=3, split="test", form="expression")
    assert chain_key(named[0].prompt) == expression_chain(bare[0].prompt)


def test_corpus_holds_out_depths():
    records = make_corpus(200, seed=0, mix=CorpusMix(depths=(1, 2)))
    depths = {solve(prompt)[1] for prompt in corpus_problems(records)}
    assert depths == {1, 2}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(depths=(0,)), "depths"),
        (dict(depths=()), "depths"),
        (dict(depths=(6,), distractors=(0, 20)), "letters"),
        (dict(distractors=(3, 1)), "distractors"),
        (dict(split="validation"), "split"),
        (dict(form="prose"), "form"),
    ],
    ids=["depth0", "no-depths", "too-many-variables", "bad-range", "bad-split", "bad-form"],
)
def test_depth_problems_reject_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        depth_problems(1, seed=0, **kwargs)


def test_corpus_is_deterministic_and_mixed():
    records = make_corpus(300, seed=3)
    assert records == make_corpus(300, seed=3)
    assert records != make_corpus(300, seed=4)
    assert all(len(record) == 1 and set(record) <= {"text", "messages"} for record in records)
    chats = [record["messages"] for record in records if "messages" in record]
    assert chats and len(chats) < len(records)
    assert all([turn["role"] for turn in chat] == ["user", "assistant"] for chat in chats)
    prose = [record["text"] for record in records if "text" in record and ";?" not in record["text"]]
    assert prose and all(text[0].isupper() and text.endswith(".") for text in prose)


def test_write_jsonl_cli_is_deterministic_and_leaves_no_temporaries(tmp_path):
    out = tmp_path / "corpus" / "c.jsonl"
    synthetic.main(["--out", str(out), "--docs", "40", "--seed", "5"])
    first = out.read_bytes()
    synthetic.main(["--out", str(out), "--docs", "40", "--seed", "5"])
    assert out.read_bytes() == first
    assert [json.loads(line) for line in first.decode().splitlines()] == make_corpus(40, seed=5)
    assert sorted(path.name for path in out.parent.iterdir()) == ["c.jsonl"]


def test_assets_are_reproducible(tmp_path, tokenizer):
    """The committed assets are exactly what the documented commands produce."""
    corpus = write_jsonl(tmp_path / "tiny_corpus.jsonl", make_corpus(1000, seed=0))
    assert corpus.read_bytes() == TINY_CORPUS.read_bytes()
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    build_tokenizer(training_texts(records), vocab_size=512, out_dir=tmp_path / "tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "tokenizer" / name).read_bytes() == (TINY_TOKENIZER / name).read_bytes(), name
    assert len(tokenizer) == 512


# Tokenizer -----------------------------------------------------------------------------------------


def test_special_tokens_have_ouro_ids(tokenizer):
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
    assert list(SPECIAL_TOKENS) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    assert tokenizer("a=1").input_ids == tokenizer("a=1", add_special_tokens=False).input_ids
    # Special tokens written in text are single tokens, not split into pieces.
    assert tokenizer("x<think>y</think><|endoftext|>").input_ids[1::2] == [3, 4]


@pytest.mark.parametrize(
    "text",
    [
        "k=3;q=k+4;b=7;z=q*3;e=z-5;?e=6",
        "The tiny fox saw seven mice near the river. Anna's cat slept!",
        "  leading spaces, tabs\tand\nnew lines\n\n",
        "bytes it never saw: héllo, naïve, 你好, 🙂, 12345 -> 6",
    ],
    ids=["depth", "prose", "whitespace", "unseen-bytes"],
)
def test_encode_decode_round_trip(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < len(tokenizer) for i in ids)


def test_digits_are_single_tokens(tokenizer):
    digit_ids = [tokenizer(str(d)).input_ids for d in range(10)]
    assert all(len(ids) == 1 for ids in digit_ids)
    assert len({ids[0] for ids in digit_ids}) == 10
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("x=90210; 2024 y").input_ids)
    assert [token for token in tokens if any(c.isdigit() for c in token)] == list("902102024")
    # The answer is one token after the prompt, so exact match on that token scores a problem.
    for problem in depth_problems(50, seed=0, split="test"):
        prompt_ids = tokenizer(problem.prompt).input_ids
        answer_id = tokenizer.convert_tokens_to_ids(problem.answer)
        assert tokenizer(problem.text).input_ids == prompt_ids + [answer_id]


def test_chat_template_renders_chatml(tokenizer):
    assert tokenizer.apply_chat_template(CHAT, tokenize=False) == CHATML
    prompt = tokenizer.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\na=1;?a=<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 2
    assert tokenizer.decode(ids) == CHATML


def test_build_tokenizer_saves_atomically_and_loads_back(tmp_path):
    texts = [problem.text for problem in depth_problems(200, seed=0, split="train")]
    texts += training_texts(make_corpus(100, seed=0))
    out = tmp_path / "tok"
    out.mkdir()
    (out / "stale.txt").write_text("left by an earlier run")
    built = build_tokenizer(texts, vocab_size=300, out_dir=out)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tok"]  # no temporaries left beside it
    assert sorted(path.name for path in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in config["chat_template"]
    loaded = AutoTokenizer.from_pretrained(out)
    assert len(loaded) == len(built) == 300
    assert loaded.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
    assert loaded.apply_chat_template(CHAT, tokenize=False) == CHATML
    assert loaded(texts[0]).input_ids == built(texts[0]).input_ids


def test_build_tokenizer_rejects_a_vocabulary_without_room_for_bytes():
    with pytest.raises(ValueError, match="261"):
        build_tokenizer(["abc"], vocab_size=260)


def test_training_texts_rejects_records_without_text():
    with pytest.raises(ValueError, match=r"record 1 has neither.*\['body'\]"):
        list(training_texts([{"text": "ok"}, {"body": "no"}]))


# Loading ---------------------------------------------------------------------------------------------

RECORDS = [{"text": "first document"}, {"text": "second document"}, {"text": "third one"}]


def write_records(path: Path, records) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    elif path.suffix == ".parquet":
        datasets.Dataset.from_list(records).to_parquet(str(path))
    else:
        path.write_text("\n".join(record["text"] for record in records))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_load_local_files(tmp_path, suffix):
    path = write_records(tmp_path / f"data{suffix}", RECORDS)
    documents = load_text_dataset(path, cache_dir=tmp_path / "cache")
    assert documents == [record["text"] for record in RECORDS]


def test_load_txt_files_are_documents(tmp_path):
    texts = ["line one\nline two\n\n\nnext paragraph\n", "  second file, kept as is  ", "\n \n"]
    folder = tmp_path / "texts"
    folder.mkdir()
    for index, text in enumerate(texts):
        (folder / f"{index}.txt").write_text(text)
    assert load_text_dataset(folder, cache_dir=tmp_path / "cache") == texts[:2]  # the blank one is dropped


def test_load_directory_list_and_custom_field(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "part").mkdir(parents=True)
    write_records(folder / "b.jsonl", [{"body": "from b"}])
    write_records(folder / "part" / "a.jsonl", [{"body": "from a"}])
    cache = tmp_path / "cache"
    assert load_text_dataset(folder, text_field="body", cache_dir=cache) == ["from b", "from a"]
    files = [folder / "part" / "a.jsonl", folder / "b.jsonl"]
    assert load_text_dataset(files, text_field="body", cache_dir=cache) == ["from a", "from b"]


def test_messages_are_rendered_with_the_chat_template(tmp_path, tokenizer):
    path = write_records(tmp_path / "mixed.jsonl", [{"text": "plain words"}, {"messages": CHAT}])
    documents = load_text_dataset(path, tokenizer, cache_dir=tmp_path / "cache")
    assert documents == ["plain words", CHATML]
    with pytest.raises(ValueError, match="pass a tokenizer with a chat template"):
        load_text_dataset(path, cache_dir=tmp_path / "cache")


def test_tiny_corpus_loads(tmp_path, tokenizer):
    documents = load_text_dataset(TINY_CORPUS, tokenizer, cache_dir=tmp_path / "cache")
    assert len(documents) == 1000
    chats = [document for document in documents if document.startswith("<|im_start|>user\n")]
    assert 0 < len(chats) < 1000 and all(chat.endswith("<|im_end|>\n") for chat in chats)


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"text": "fine"}\n{not json\n', r"cannot read json data .*JSON parse error"),
        ("bad.parquet", b"not a parquet file", r"cannot read parquet data"),
        ("bad.txt", b"\xff\xfe invalid utf-8", r"cannot read text data .*UnicodeDecodeError"),
        ("empty.jsonl", "", r"is empty"),
        ("blank.txt", "\n\n  \n", r"is empty"),
        ("blank-text.jsonl", '{"text": ""}\n', r"is empty: its 1 records hold no text"),
        ("fields.jsonl", '{"body": "x", "id": 1}\n', r"neither a 'text' nor a 'messages' field; .* \['body', 'id'\]"),
        ("number.jsonl", '{"text": 3}\n', r"record 0 .* 'text' is of type int, not a string"),
        ("partial.jsonl", '{"text": "a"}\n{"other": 1}\n', r"record 1 .* has neither 'text' nor 'messages'"),
        ("data.csv", "text\nhello\n", r"unsupported dataset file type"),
    ],
    ids=[
        "bad-json", "bad-parquet", "bad-utf8", "empty-file", "blank-txt", "blank-text", "no-field",
        "not-a-string", "no-text-in-a-record", "csv",
    ],
)  # fmt: skip
def test_load_errors(tmp_path, name, content, message):
    path = _write(tmp_path, name, content)
    spec = [path] if path.suffix == ".csv" else path
    with pytest.raises(ValueError, match=message):
        load_text_dataset(spec, cache_dir=tmp_path / "cache")


def test_load_errors_for_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_text_dataset(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="does not exist"):
        load_text_dataset("./missing")
    with pytest.raises(ValueError, match=r"do not exist: \[.*missing.parquet"):
        load_text_dataset([write_records(tmp_path / "a.jsonl", RECORDS), tmp_path / "missing.parquet"])
    with pytest.raises(ValueError, match=r"mix formats \(\['json', 'text'\]\)"):
        load_text_dataset([tmp_path / "a.jsonl", write_records(tmp_path / "b.txt", RECORDS)])
    empty_table = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({"text": []}).to_parquet(str(empty_table))
    with pytest.raises(ValueError, match="is empty: the files hold no records"):
        load_text_dataset(empty_table, cache_dir=tmp_path / "cache")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        load_text_dataset(tmp_path / "empty_dir")


def test_hub_ids_go_to_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(path, split, cache_dir):
        calls.append((path, split))
        return datasets.Dataset.from_dict({"text": ["hub document"] if path == "owner/full" else []})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_text_dataset("owner/full", split="validation") == ["hub document"]
    with pytest.raises(ValueError, match="'owner/empty' is empty: it has no records"):
        load_text_dataset("owner/empty")
    assert calls == [("owner/full", "validation"), ("owner/empty", "train")]


def test_unreachable_hub_says_to_pass_local_files(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network in tests, and fast
    with pytest.raises(ValueError, match=r"Hub cannot be reached.*pass local .json/.jsonl/.parquet/.txt"):
        load_text_dataset("someone/some-corpus")


# Packing ----------------------------------------------------------------------------------------


def test_pack_sequences_shapes_and_determinism(tokenizer):
    texts = [f"document {i}: " + "the fox ran. " * (i % 5) for i in range(40)]
    rows = pack_sequences(texts, tokenizer, seq_len=16, seed=0)
    total = sum(len(tokenizer(text).input_ids) + 1 for text in texts)
    assert rows.dtype == torch.long and rows.shape == (total // 16, 16)
    assert torch.equal(rows, pack_sequences(texts, tokenizer, seq_len=16, seed=0))
    assert not torch.equal(rows, pack_sequences(texts, tokenizer, seq_len=16, seed=1))


def test_pack_sequences_keeps_every_document_once(tokenizer):
    texts = [f"doc {i} says a=b+{i % 10}" for i in range(12)]
    total = sum(len(tokenizer(text).input_ids) + 1 for text in texts)
    (row,) = pack_sequences(texts, tokenizer, seq_len=total, seed=7)  # exactly one row, nothing dropped
    assert row[-1].item() == tokenizer.eos_token_id
    pieces = tokenizer.decode(row).split(tokenizer.eos_token)
    assert pieces[-1] == "" and sorted(pieces[:-1]) == sorted(texts) and pieces[:-1] != texts


def test_pack_sequences_errors(tokenizer):
    texts = ["a b", "c"]
    total = sum(len(tokenizer(text).input_ids) + 1 for text in texts)
    with pytest.raises(ValueError, match=rf"hold {total} tokens .* fewer than the 8 needed .*seq_len=8"):
        pack_sequences(texts, tokenizer, seq_len=8, seed=0)
    with pytest.raises(ValueError, match="no documents"):
        pack_sequences([], tokenizer, seq_len=8, seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        pack_sequences(["a"], tokenizer, seq_len=0, seed=0)


def test_split_holdout():
    rows = torch.arange(40).view(10, 4)
    train, held_out = split_holdout(rows, 0.2)
    assert torch.equal(train, rows[:8]) and torch.equal(held_out, rows[8:])
    train, held_out = split_holdout(rows, 3)
    assert train.shape == (7, 4) and held_out.shape == (3, 4)
    assert split_holdout(rows, 0.01)[1].shape == (1, 4)  # a fraction always keeps at least one row
    for bad in (0.0, 1.0, 0, 10, True, "3"):
        with pytest.raises(ValueError):
            split_holdout(rows, bad)



@pytest.mark.parametrize(
    "messages",
    ['"hello"', '[{"role": "user"}]', '[{"role": "user", "content": 3}]', '["hello"]', '{"role": "user"}'],
    ids=["string", "no-content", "content-not-text", "list-of-strings", "one-object"],
)
def test_malformed_messages_are_named(tmp_path, tokenizer, messages):
    path = tmp_path / "chat.jsonl"
    path.write_text(f'{{"messages": {messages}}}\n')
    with pytest.raises(ValueError, match=r"record 0 of dataset .*chat.jsonl.*'messages' must be a list of"):
        load_text_dataset(path, tokenizer, cache_dir=tmp_path / "cache")
