"""docs/BENCHMARKS.md "Process start-up": the start-up of a process that trains on digits (salunet's trainer imported,
the digits read) against the same plus what it imported before the seventeenth session (torch.distributed.fsdp,
sklearn.datasets); the two alternated, median of 7 each, one JSON line."""
import json
import statistics
import subprocess
import sys
import time

NOW = "import salunet.train.loop; from salunet.data import load_digits; load_digits()"
BEFORE = "import torch.distributed.fsdp, sklearn.datasets; " + NOW


def main() -> None:
    times = {"now": [], "before": []}
    for _ in range(7):
        for key, code in (("now", NOW), ("before", BEFORE)):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"now_s": round(med["now"], 2), "before_s": round(med["before"], 2),
                      "ratio": round(med["now"] / med["before"], 2)}))


if __name__ == "__main__":
    main()
