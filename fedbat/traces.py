"""Device traces from files: one profile per client (``system.trace``) and online
intervals (``system.availability``), as CSV or Parquet, every row checked (one line naming
the file, the line or row, and the value)."""

from __future__ import annotations

import csv
import math
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fedbat.errors import ConfigError

TRACE_COLUMNS = ("client", "compute_s_per_sample", "uplink_mbps", "downlink_mbps", "latency_ms")
AVAILABILITY_COLUMNS = ("client", "start_s", "end_s")


@dataclass(frozen=True)
class Profile:
    """One device: seconds per local training sample, link bandwidths (bit/s), one-way latency."""

    compute_s_per_sample: float
    uplink_bps: float
    downlink_bps: float
    latency_s: float

    def received(self, at: float, bits: int) -> float:
        """When a download of ``bits`` started at ``at`` has arrived."""
        return at + self.latency_s + bits / self.downlink_bps

    def computed(self, received: float, samples: int) -> float:
        """When local training on ``samples`` samples, from ``received``, is done."""
        return received + self.compute_s_per_sample * samples

    def uploaded(self, computed: float, bits: int) -> float:
        """When an upload of ``bits`` started at ``computed`` has arrived."""
        return computed + self.latency_s + bits / self.uplink_bps


def _number(path: Path, line: str, column: str, text: str, low: float, open_low: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    bad = not math.isfinite(value) and not (column == "end_s" and value == math.inf)
    if bad or value < low or (open_low and value == low):
        bound = f"> {low:g}" if open_low else f">= {low:g}"
        raise ConfigError(f"{path}:{line}: {column}={text!r}: must be a finite number {bound}")
    return value


def _rows(
    path: Path, columns: tuple[str, ...], num_clients: int
) -> Iterator[tuple[str, int, list[str]]]:
    """(where, client, values) of a table with exactly ``columns``, clients in
    [0, num_clients); ``where`` is a CSV's line number or a Parquet file's ``row N``."""
    table = _parquet(path, columns) if path.suffix == ".parquet" else _csv(path, columns)
    for where, row in table:
        if len(row) != len(columns):
            raise ConfigError(f"{path}:{where}: {len(row)} values; must be {len(columns)}")
        try:
            client = int(row[0])
        except ValueError:
            client = -1
        if not 0 <= client < num_clients:
            raise ConfigError(
                f"{path}:{where}: client={row[0]!r}: must be an integer in [0, {num_clients})"
            )
        yield where, client, [c.strip() for c in row[1:]]


def _header(path: Path, header: list[str], columns: tuple[str, ...]) -> None:
    if tuple(header) != columns:
        raise ConfigError(
            f"{path}: the header is {','.join(header)!r}; must be {','.join(columns)}"
        )


def _csv(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[str, list[str]]]:
    try:
        f = open(path, newline="")  # noqa: SIM115  (closed below)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it ({err.strerror})") from None
    with f:
        reader = csv.reader(f)
        _header(path, [h.strip() for h in next(reader, [])], columns)
        for line, row in enumerate(reader, start=2):
            if row:
                yield str(line), row


def _parquet(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[str, list[str]]]:
    """A Parquet table's rows as text, checked as a CSV's are (pyarrow, the ``parquet``
    extra)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            f"{path}: reading Parquet needs pyarrow: pip install 'fedbat[parquet]'"
        ) from None
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"{path}: not a readable Parquet file ({str(err)[:160]})") from None
    _header(path, list(table.column_names), columns)
    values = [table.column(c).to_pylist() for c in columns]
    for i, row in enumerate(zip(*values, strict=True), start=1):
        yield f"row {i}", [str(v) for v in row]


def read_trace(path: Path, num_clients: int) -> list[Profile]:
    """One profile per client from a CSV or Parquet table ``client,compute_s_per_sample,
    uplink_mbps,downlink_mbps,latency_ms``, which must list every client once."""
    profiles: dict[int, Profile] = {}
    for line, client, (compute, up, down, latency) in _rows(path, TRACE_COLUMNS, num_clients):
        if client in profiles:
            raise ConfigError(f"{path}:{line}: client {client} is listed twice")
        profiles[client] = Profile(
            _number(path, line, "compute_s_per_sample", compute, 0.0, False),
            1e6 * _number(path, line, "uplink_mbps", up, 0.0, True),
            1e6 * _number(path, line, "downlink_mbps", down, 0.0, True),
            _number(path, line, "latency_ms", latency, 0.0, False) / 1e3,
        )
    if missing := sorted(set(range(num_clients)) - set(profiles)):
        raise ConfigError(
            f"{path}: no row for client {missing[0]} ({len(missing)} of {num_clients} missing); "
            "the trace must list every client"
        )
    return [profiles[c] for c in range(num_clients)]


def read_availability(path: Path, num_clients: int) -> dict[int, list[tuple[float, float]]]:
    """Each listed client's online intervals ``[start_s, end_s)`` (overlaps merged)."""
    spans: dict[int, list[tuple[float, float]]] = {}
    for line, client, (start, end) in _rows(path, AVAILABILITY_COLUMNS, num_clients):
        s = _number(path, line, "start_s", start, 0.0, False)
        e = _number(path, line, "end_s", end, 0.0, False)
        if e <= s:
            raise ConfigError(f"{path}:{line}: end_s={end!r}: must be after start_s={start!r}")
        spans.setdefault(client, []).append((s, e))
    merged = {}
    for client, intervals in spans.items():
        out: list[tuple[float, float]] = []
        for s, e in sorted(intervals):
            if out and s <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], e))
            else:
                out.append((s, e))
        merged[client] = out
    return merged


class _DataOnly(pickle.Unpickler):
    """Unpickles containers, numbers and strings only: any class or function a pickle
    names (how a malicious one runs code) is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> object:
        raise ConfigError(
            f"the pickle names {module}.{name}; a FedScale trace holds only dicts, lists, "
            "numbers and strings, so it is not read"
        )


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = _DataOnly(f).load()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it ({err.strerror})") from None
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ConfigError(f"{path}: not a pickle ({err})") from None
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: holds a {type(data).__name__}; must be a dict of clients")
    return data


def convert_fedscale(
    capacity: Path, behaviour: Path | None, num_clients: int, horizon_s: float, out: Path
) -> tuple[Path, Path | None]:
    """FedScale's device traces as fedbat's CSVs: fedbat client c is the trace's c-th client
    (keys in sorted order). ``client_device_capacity``: ``computation`` (ms a sample for
    inference; FedScale charges 3x for training) and ``communication`` (kbit/s of 1024 bits,
    both ways), so ``compute_s_per_sample = 3 x computation / 1000`` and both links
    ``communication x 1024 / 1e6`` Mbit/s, no latency. ``client_behave_trace``: ``active``
    and ``inactive`` times (s) of intervals repeating every ``finish_time`` s, unrolled up to
    ``horizon_s``. Returns the files written (``trace.csv``, ``availability.csv``)."""
    devices = _load_pickle(capacity)
    keys = sorted(devices)[:num_clients]
    if len(keys) < num_clients:
        raise ConfigError(f"{capacity}: {len(keys)} clients; --clients {num_clients} asked")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for c, key in enumerate(keys):
        d = devices[key]
        try:
            compute, link = float(d["computation"]), float(d["communication"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(
                f"{capacity}: client {key!r}: needs numbers 'computation' and 'communication'"
            ) from None
        mbps = link * 1024 / 1e6
        rows.append(f"{c},{3 * compute / 1000!r},{mbps!r},{mbps!r},0")
    trace = out / "trace.csv"
    trace.write_text("\n".join([",".join(TRACE_COLUMNS), *rows]) + "\n")
    if behaviour is None:
        return trace, None
    behave = _load_pickle(behaviour)
    spans = []
    for c, key in enumerate(keys):
        if key not in behave:
            continue  # always online
        b = behave[key]
        try:
            period = float(b["finish_time"])
            pairs = list(zip(map(float, b["active"]), map(float, b["inactive"]), strict=True))
        except (KeyError, TypeError, ValueError):
            raise ConfigError(
                f"{behaviour}: client {key!r}: needs 'finish_time' and equally long "
                "'active' and 'inactive' lists of seconds"
            ) from None
        if not (math.isfinite(period) and period > 0):
            raise ConfigError(f"{behaviour}: client {key!r}: finish_time={period!r}: must be > 0")
        for k in range(math.ceil(horizon_s / period)):
            spans += [f"{c},{k * period + s!r},{k * period + e!r}" for s, e in pairs if e > s]
    availability = out / "availability.csv"
    availability.write_text("\n".join([",".join(AVAILABILITY_COLUMNS), *spans]) + "\n")
    return trace, availability
