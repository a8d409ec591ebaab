"""Property-based fuzzing of the topology loader (issue 10): whatever the TOML text or the
parsed mapping, `load_topology` / `parse_topology` either return a `Topology` or raise a
`TopologyError` naming a field, never another exception."""

from __future__ import annotations

import json
import math

from hypothesis import example, given, strategies as st

from tests.fuzzing import fuzz_settings
from topology.config import (ACTOR_KINDS, API_FIELDS, BACKENDS, EXAMPLES, Topology, TopologyError, load_topology,
                             parse_topology, with_api_overrides, with_speculative)

EXAMPLE_TEXTS = sorted(p.read_text() for p in EXAMPLES.glob("*.toml"))
REPLACEMENTS = ["[1, 2]", "{}", '""', "-1", "1e999", "true", "[[1]]", "{a = [1]}", '"cuda:99"', '["a", 1]',
                '"\\u00e9"', '"\u00e9"', "nan", "0x7fffffffffffffff", "[{}]"]

# TOML values: what tomllib can produce (no None; tables are dicts with string keys).
_scalars = st.one_of(st.booleans(), st.integers(min_value=-(2**64), max_value=2**64), st.floats(allow_nan=True),
                     st.text(max_size=12), st.sampled_from(["default", "cpu", "cuda:0", "cuda:x", "local", "shm",
                                                            "tcp", "nccl", "127.0.0.1", "float32", *ACTOR_KINDS]))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                       max_leaves=12)
_API = st.dictionaries(st.sampled_from(sorted(API_FIELDS) + ["bogus"]), _values, max_size=5)
_ACTOR = st.dictionaries(st.sampled_from(["kind", "node", "device", "replicas", "threads", "bogus"]),
                         st.one_of(st.sampled_from(ACTOR_KINDS), _values), max_size=5)
_NODE = st.dictionaries(st.sampled_from(["host", "base_port", "port"]), _values, max_size=3)
_shaped = st.fixed_dictionaries({}, optional={
    "name": _values,
    "model": st.one_of(_values, st.dictionaries(st.sampled_from(["path", "dtype", "page_size", "kv_pages", "x"]),
                                                _values, max_size=4)),
    "api": st.one_of(_values, _API),
    "nodes": st.one_of(_values, st.dictionaries(st.text(max_size=6), st.one_of(_NODE, _values), max_size=3)),
    "actors": st.one_of(_values, st.lists(st.one_of(_ACTOR, _values), max_size=6)),
    "transfer": st.one_of(_values, st.fixed_dictionaries({"backend": st.one_of(st.sampled_from(BACKENDS), _values)})),
    "speculative": st.one_of(_values, st.dictionaries(st.sampled_from(["draft_model_path", "num_speculative_tokens"]),
                                                      _values, max_size=2)),
})


def _check(call):
    """Run `call`; it must give a Topology or a TopologyError naming its field."""
    try:
        result = call()
    except TopologyError as exc:
        assert isinstance(exc.field, str) and exc.field and exc.field in str(exc)
        return None
    assert isinstance(result, Topology)
    return result


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string for these characters
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"


def _toml(raw: dict) -> str:
    return "\n".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in raw.items())


@fuzz_settings(300)
@given(_shaped)
@example({"nodes": {"a": {}}, "actors": [{"kind": "preprocess", "node": ["a"]}, {"kind": "engine"}]})
@example({"nodes": {"a": {}}, "actors": [{"kind": "preprocess"}, {"kind": "engine"}], "api": {"node": {}}})
@example({"nodes": {"a": {}}, "actors": [{"kind": "preprocess"}, {"kind": "engine"}],
          "api": {"default_chat_template_kwargs": [1, 2]}})
@example({"nodes": {"a": {}}, "actors": [{"kind": "preprocess"}, {"kind": "engine"}],
          "api": {"limit_mm_per_prompt": [[1, 2, 3]]}})
def test_parse_topology_on_shaped_mappings(raw):
    _check(lambda: parse_topology(raw))


@fuzz_settings(150)
@given(_shaped)
def test_load_topology_on_shaped_toml(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("topo") / "t.toml"
    text = _toml(raw)
    path.write_text(text)
    _check(lambda: load_topology(path))


@fuzz_settings(200)
@given(st.sampled_from(EXAMPLE_TEXTS), st.data())
def test_load_topology_on_mutated_example_files(tmp_path_factory, text, data):
    """Real files with a line replaced, deleted or duplicated and random text spliced in."""
    lines = text.splitlines()
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(lines) - 1))
        op = data.draw(st.sampled_from(["replace", "delete", "duplicate", "splice"]))
        if op == "replace":
            key = lines[i].partition("=")[0] if "=" in lines[i] else lines[i]
            lines[i] = f"{key}= {data.draw(st.sampled_from(REPLACEMENTS))}"
        elif op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        else:
            lines[i] = lines[i] + data.draw(st.text(max_size=8))
        if not lines:
            lines = [""]
    path = tmp_path_factory.mktemp("topo") / "t.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    _check(lambda: load_topology(path))


@fuzz_settings(200)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_load_topology_on_arbitrary_text_and_bytes(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("topo") / "t.toml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    _check(lambda: load_topology(path))


@fuzz_settings(150)
@given(st.dictionaries(st.sampled_from(sorted(API_FIELDS)), _values, max_size=4),
       st.dictionaries(st.sampled_from(["draft_model_path", "num_speculative_tokens"]), _values, max_size=2))
def test_command_line_overrides(api, speculative):
    base = load_topology(EXAMPLES / "cpu_colocated.toml")
    _check(lambda: with_api_overrides(base, api))
    _check(lambda: with_speculative(base, speculative))
