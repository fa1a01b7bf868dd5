"""`make mutation`: mutation testing of the modules that keep our promises, each against its fast tests.

Uses cosmic-ray (maintained, mutates the files in place and restores them), which works with the
package-directory mapping (`lineside.agent` -> `agent/`) where tools that copy the tree elsewhere do not.
Writes build/mutation/<module>.sqlite (resumable: a second run finishes pending mutants),
build/mutation/summary.json ({"<module path>": {"killed", "survived", "total", ...}}) and
build/mutation/report.md (every surviving mutant with its diff). Do not edit or test the tree while it
runs: the mutants are written into the source files.

    python tests/mutation/run.py [MODULE ...] [--max-mutants N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "build" / "mutation"
EXPORT_PY = REPO / ".venv" / "bin" / "python"
AGENT_PY = REPO / ".venv-agent" / "bin" / "python"
PYTEST = "-m pytest -x -q -p no:cacheprovider -p no:randomly"

# module -> (interpreter, the fast tests that cover it). Agent modules run in the MXNet-free env against
# the bundle `make test` leaves in build/test-bundle, so no mutant pays for a training run.
MODULES: dict[str, tuple[Path, list[str]]] = {
    "agent/bundle/loader.py": (AGENT_PY, ["tests/agent/test_bundle_loader.py", "tests/agent/test_engine.py"]),
    "agent/imaging.py": (AGENT_PY, ["tests/agent/test_imaging.py"]),
    "agent/sources/folder.py": (AGENT_PY, ["tests/agent/test_folder_source.py"]),
    "export/onnx_export.py": (EXPORT_PY, ["tests/export/test_parity.py"]),
}

# One representative replacement per operator family: every comparison, boolean and constant change,
# but not all eleven arithmetic swaps of each `+` (they rarely fail where the first one passes).
# Left out as equivalent by construction: `|` <-> `&` (in these modules `|` appears only in type
# annotations, which `from __future__ import annotations` never evaluates) and `==` <-> `is` (the
# operands are interned strings and small ints, for which both are the same).
EXCLUDED_OPERATORS = [
    r"core/ReplaceBinaryOperator_(?!Add_Sub|Sub_Add|Mul_Div|Div_Mul|FloorDiv_Div|Mod_FloorDiv).*",
    r"core/ReplaceComparisonOperator_(Is|IsNot|In|NotIn)_.*",
    r"core/ReplaceComparisonOperator_.*_(Is|IsNot)$",
]


def _config(module: str, python: Path, tests: list[str], timeout: float) -> str:
    return textwrap.dedent(
        f"""\
        [cosmic-ray]
        module-path = "{module}"
        timeout = {timeout}
        excluded-modules = []
        test-command = "{python} {PYTEST} {" ".join(tests)}"

        [cosmic-ray.distributor]
        name = "local"

        [cosmic-ray.filters.operators-filter]
        exclude-operators = {json.dumps(EXCLUDED_OPERATORS)}
        """
    )


def _cosmic(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("cosmic-ray")
    return subprocess.run([str(exe), *args], cwd=REPO, capture_output=True, text=True, check=False)


def run_module(module: str, timeout: float) -> tuple[dict[str, int], list[str]]:
    """Mutate one module; returns its counts and the report lines of its surviving mutants."""
    python, tests = MODULES[module]
    stem = module.replace("/", "_").removesuffix(".py")
    config, session = OUT / f"{stem}.toml", OUT / f"{stem}.sqlite"
    config.write_text(_config(module, python, tests, timeout), encoding="utf-8")
    for needed in (REPO / "build" / "test-bundle" / "manifest.json", REPO / "build" / "test-runs"):
        if not needed.exists():
            raise SystemExit(f"{needed} is missing: run `make test` first (it leaves the test bundle and runs)")
    if not session.exists():
        subprocess.run(
            [str(Path(sys.executable).with_name("cosmic-ray")), "init", str(config), str(session)], cwd=REPO, check=True
        )
        filt = Path(sys.executable).with_name("cr-filter-operators")
        subprocess.run([str(filt), str(session), str(config)], cwd=REPO, check=True)
    print(f"{module}: mutating (tests: {' '.join(tests)})", flush=True)
    done = _cosmic("exec", str(config), str(session))
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
    counts: Counter[str] = Counter()
    survivors: list[str] = []
    for line in _cosmic("dump", str(session)).stdout.splitlines():
        item, result = json.loads(line)
        if result is None:
            counts["pending"] += 1
            continue
        if item.get("mutations") == [] or result.get("worker_outcome") == "skipped":
            counts["skipped"] += 1
            continue
        outcome = result.get("test_outcome")
        if result.get("worker_outcome") == "abnormal" or outcome == "killed":
            counts["killed"] += 1  # a crash or timeout of the tests also detects the mutant
        elif outcome == "survived":
            counts["survived"] += 1
            mutation = item["mutations"][0]
            diff = result.get("diff") or ""
            where = f"{module}:{mutation['start_pos'][0]} `{mutation['operator_name']}`"
            survivors.append(f"### {where}\n\n```diff\n{diff.strip()}\n```\n")
        else:
            counts["incompetent"] += 1
    total = counts["killed"] + counts["survived"]
    summary = {
        "killed": counts["killed"],
        "survived": counts["survived"],
        "total": total,
        "score": round(counts["killed"] / total, 4) if total else None,
        "incompetent": counts["incompetent"],
        "pending": counts["pending"],
    }
    return summary, survivors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=list(MODULES), help="module paths (default: all)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per mutant's test run")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    summary_path = OUT / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    report = ["# Surviving mutants\n", "Each one is explained in docs/testing.md or gets a test.\n"]
    # What `make test` left in build/: the bundle, and the runs it was built from (no training per mutant).
    os.environ.setdefault("LINESIDE_TEST_BUNDLE", str(REPO / "build" / "test-bundle"))
    os.environ.setdefault("LINESIDE_TEST_RUNS", str(REPO / "build" / "test-runs"))
    for module in args.modules:
        if module not in MODULES:
            parser.error(f"unknown module {module!r}; expected some of {sorted(MODULES)}")
        summary[module], survivors = run_module(module, args.timeout)
        report += [f"\n## {module}: {summary[module]}\n", *survivors]
        summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(f"{module}: {summary[module]}", flush=True)
    (OUT / "report.md").write_text("\n".join(report), encoding="utf-8")
    low = {m: s["score"] for m, s in summary.items() if s["score"] is not None and s["score"] < 0.8}
    if low:
        print(f"below 80 % killed: {low}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
