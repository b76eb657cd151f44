"""[source] streaming and logical_decoding_work_mem: defaults, values, the one line a wrong
value gets."""

from __future__ import annotations

import pytest
from plugins.replicator import write_config

from replicator.config.load import load_config
from replicator.errors import ConfigError


def test_defaults(tmp_path):
    src = load_config(write_config(tmp_path)).source
    assert (src.streaming, src.logical_decoding_work_mem) == (True, "8MB")


def test_values_from_the_file(tmp_path):
    src = load_config(write_config(
        tmp_path, source={"streaming": False, "logical_decoding_work_mem": "256MB"})).source
    assert (src.streaming, src.logical_decoding_work_mem) == (False, "256MB")


def test_empty_means_the_servers_setting(tmp_path):
    src = load_config(write_config(tmp_path, source={"logical_decoding_work_mem": ""})).source
    assert src.logical_decoding_work_mem == ""


@pytest.mark.parametrize("value", ["64", "64 MB", "0MB", "1TB", "64mb", "-1kB"])
def test_a_wrong_memory_size_is_one_clear_line(tmp_path, value):
    with pytest.raises(ConfigError) as exc:
        load_config(write_config(tmp_path, source={"logical_decoding_work_mem": value}))
    line = exc.value.one_line()
    assert line.startswith(f"[source] logical_decoding_work_mem: {value!r} is not a memory size")
    assert "kB, MB or GB" in line and "\n" not in line


def test_streaming_must_be_a_boolean(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(write_config(tmp_path, source={"streaming": "yes"}))
    assert exc.value.message.startswith("[source] streaming:"), exc.value.message
