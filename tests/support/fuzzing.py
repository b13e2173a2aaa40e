"""Hypothesis strategies for config values at the edges: what the fast
config fuzz (tests/unit/test_fuzz.py) and the daemon fuzz
(tests/system/test_fuzz.py) both draw from."""

from __future__ import annotations

import json

from hypothesis import strategies as st


def toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid TOML basic string


scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(
        lambda f: {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(str(f), repr(f))
    ),
    st.booleans().map(lambda b: "true" if b else "false"),
    st.text(max_size=40).map(toml_string),
    st.sampled_from(['"1s"', '"500ms"', '"-1s"', '"1e9m"', '"SIGKILL"', '"0o777"', '"::1"']),
    st.sampled_from(['"127.0.0.1:0"', '"[::1]:65536"', '"udp://0.0.0.0:53"', '"tcp://x:1"']),
)


values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda items: "[" + ", ".join(items) + "]"),
        st.dictionaries(
            st.sampled_from(["kind", "cert", "path", "x", "rcvbuf"]), inner, max_size=3
        ).map(lambda d: "{ " + ", ".join(f"{k} = {v}" for k, v in d.items()) + " }"),
    ),
    max_leaves=8,
)
