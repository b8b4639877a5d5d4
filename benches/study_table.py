"""Tables of the recipe study (benches/recipe_study.sh): mean and spread over seeds.

    python3 benches/study_table.py OUT [SUBSET ...]

Reads OUT/SUBSET/NAME-sSEED.json (`whvi eval --report` files) and the training logs next to
them (OUT/SUBSET/NAME-sSEED/metrics.jsonl, or -mM/ for ensemble members), and prints one
Markdown table per subset: each cell is the mean over seeds, +- the sample standard deviation
when there are several. Standard library only.
"""

import json
import re
import statistics
import sys
from pathlib import Path

# (column, how to read it from a report); None when the report lacks it.
COLUMNS = [
    ("acc", lambda r: r["accuracy"]),
    ("NLL", lambda r: r["nll"]),
    ("Brier", lambda r: r["brier"]),
    ("ECE-15", lambda r: r["ece15"]),
    ("NLL (T)", lambda r: (r.get("temperature_scaling") or {}).get("nll")),
    ("ECE-15 (T)", lambda r: (r.get("temperature_scaling") or {}).get("ece15")),
    ("corr. acc", lambda r: r.get("corrupted_accuracy")),
    ("corr. NLL", lambda r: r.get("corrupted_nll")),
    ("corr. ECE-15", lambda r: r.get("corrupted_ece15")),
    ("corr. NLL (T)", lambda r: scaled_corrupted(r, "nll")),
    ("corr. ECE-15 (T)", lambda r: scaled_corrupted(r, "ece15")),
    ("AUROC entropy", lambda r: r.get("ood_auroc_entropy")),
    ("AUROC MI", lambda r: bayesian(r, "ood_auroc_mi")),
    ("MI", lambda r: bayesian(r, "mean_mutual_information")),
]


def scaled_corrupted(report, key):
    """A corrupted-set mean after temperature scaling (None without one)."""
    return ((report.get("temperature_scaling") or {}).get("corrupted") or {}).get(key)


def bayesian(report, key):
    """A value that means something only with several posterior samples (None with one)."""
    return report.get(key) if (report.get("num_samples") or 1) > 1 else None


def training_minutes(run_dirs):
    """Training wall time of the runs behind one report (an ensemble's members summed)."""
    total = 0.0
    for run in run_dirs:
        log = run / "metrics.jsonl"
        if not log.exists():
            return None
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        total += sum(epoch["seconds"] for epoch in lines)
    return total / 60.0


def cell(values, digits=4):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def subset_table(folder):
    runs = {}
    for report in sorted(folder.glob("*-s*.json")):
        match = re.fullmatch(r"(.+)-s(\d+)", report.stem)
        if not match:
            continue
        name = match.group(1)
        data = json.loads(report.read_text())
        stem = folder / report.stem
        members = sorted(folder.glob(report.stem + "-m*"))
        runs.setdefault(name, []).append((data, members if members else [stem]))
    if not runs:
        return None
    header = ["configuration", "seeds", "parameters", "train min"] + [c for c, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, reports in runs.items():
        row = [name, str(len(reports)), str(reports[0][0].get("parameters", "-"))]
        row.append(cell([training_minutes(m) for _, m in reports], 1))
        row += [cell([read(r) for r, _ in reports]) for _, read in COLUMNS]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    subsets = sys.argv[2:] or sorted(p.name for p in out.iterdir() if p.is_dir())
    machine = out / "machine.txt"
    if machine.exists():
        print(machine.read_text().strip() + "\n")
    for subset in subsets:
        table = subset_table(out / subset)
        if table is None:
            print(f"## {subset}\n\n(no reports in {out / subset})\n")
            continue
        print(f"## {subset}\n\n{table}\n")


if __name__ == "__main__":
    main()
