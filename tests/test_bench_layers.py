"""bench.layers on CPU devices: every strategy the mesh admits gets a row, timed either way."""

import pytest

from mixjax.bench import layers


@pytest.mark.parametrize("flags", [[], ["--device-time"]])
def test_bench_layers_times_every_strategy(flags, capsys):
    assert layers.main(["--mesh", "2x1", "--preset", "tiny", "--batch", "8", "--ctx", "16", "--iters", "2",
                        "--dtype", "float32", "--strategies", "tp,hybrid"] + flags) == 0
    out = capsys.readouterr().out
    assert ("device time per forward" in out) == bool(flags)
    rows = {line.split()[0]: [float(v) for v in line.split()[1:4]] for line in out.splitlines()
            if line.split() and line.split()[0] in ("tp", "hybrid")}
    assert set(rows) == {"tp", "hybrid"}
    for dense, moe, _ in rows.values():
        assert dense > 0 and moe > 0
