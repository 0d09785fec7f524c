"""Opening the configured store: each backend's libraries load only when it is chosen."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]

_OPEN_AND_LIST_MODULES = textwrap.dedent(
    """
    import asyncio, json, pathlib, sys
    from exporter.config import Settings
    from exporter.store import open_store

    store = open_store(Settings(**json.loads(sys.argv[1])))
    loaded = [name for name in ("duckdb", "influxdb_client") if name in sys.modules]
    asyncio.run(store.close())
    print(json.dumps({"store": store.name, "loaded": loaded}))
    """
)


def _open_in_fresh_interpreter(settings: dict[str, str]) -> dict[str, object]:
    """Open the store ``settings`` select in a new interpreter; its name and heavy modules."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPORTER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", _OPEN_AND_LIST_MODULES, json.dumps(settings)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


@pytest.mark.parametrize(
    ("settings", "store", "loaded"),
    [
        ({"store": "duckdb"}, "duckdb", ["duckdb"]),
        (
            {
                "store": "influxdb",
                "influx_url": "http://127.0.0.1:9",
                "influx_token": "t",
                "influx_org": "o",
            },
            "influxdb",
            ["influxdb_client"],
        ),
    ],
    ids=["duckdb", "influxdb"],
)
def test_each_store_loads_only_its_own_client_library(
    tmp_path: pathlib.Path, settings: dict[str, str], store: str, loaded: list[str]
) -> None:
    """A DuckDB exporter never imports the InfluxDB client, and the other way round."""
    answer = _open_in_fresh_interpreter({"data_dir": str(tmp_path), **settings})
    assert answer == {"store": store, "loaded": loaded}
