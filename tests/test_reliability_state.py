"""Settings read from the environment fail with a message naming the variable."""
import pytest

from kvlab import env


def test_kvlab_threads_must_be_a_number(monkeypatch):
    monkeypatch.setenv("KVLAB_THREADS", "abc")
    with pytest.raises(ValueError, match=r"KVLAB_THREADS='abc' is not a whole number"):
        env.cpu_threads()
    monkeypatch.setenv("KVLAB_THREADS", " 3 ")
    assert env.cpu_threads() == 3
    monkeypatch.setenv("KVLAB_THREADS", "")
    assert env.cpu_threads() >= 1
