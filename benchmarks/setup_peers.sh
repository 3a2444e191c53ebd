#!/usr/bin/env bash
# Install the peer libraries that benchmarks/bench_peers.py times saelab against, into the project venv.
#
#   eai-sparsify==1.3.3  (EleutherAI sparsify: SparseCoder, TopK with a sparse decoder)
#   sae-lens==6.54.0     (SAELens: TopKTrainingSAE / BatchTopKTrainingSAE; pulls transformer-lens)
#
# They are NOT saelab dependencies. Checked on 2026-11-21 with `pip install --dry-run --report`: both resolve
# against saelab's pins (torch 2.13.0, transformers 5.23.0, numpy 2.4.6, safetensors 0.8.0, ...) and only ADD
# ~54 packages (datasets, pandas, pyarrow, wandb, transformer-lens, ...), changing none that is installed. To keep
# it that way every run installs under a constraints file that pins each package saelab pins (read from
# pyproject.toml) and every package already in the venv at its current version, so pip fails loudly rather than
# moving torch or transformers if a future resolve would. Needs scripts/setup.sh first. Idempotent.
# Usage: bash benchmarks/setup_peers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=.venv/bin/python
[ -x "$VPY" ] || { echo "setup_peers: no .venv; run 'bash scripts/setup.sh' first" >&2; exit 1; }
"$VPY" -c "import saelab" 2>/dev/null || { echo "setup_peers: saelab not installed in .venv; run 'bash scripts/setup.sh' first" >&2; exit 1; }
if "$VPY" -c "
import importlib.metadata as m, sys
sys.exit(0 if (m.version('eai-sparsify'), m.version('sae-lens')) == ('1.3.3', '6.54.0') else 1)" 2>/dev/null; then
    echo "setup_peers: eai-sparsify 1.3.3 and sae-lens 6.54.0 already installed"; exit 0
fi
CONS=$(mktemp --suffix=.txt)
trap 'rm -f "$CONS"' EXIT
"$VPY" - "$CONS" <<'EOF'
import importlib.metadata as md, sys, tomllib
from packaging.requirements import Requirement
proj = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = proj["dependencies"] + [r for extra in proj.get("optional-dependencies", {}).values() for r in extra]
pins = {}
for r in map(Requirement, reqs):  # saelab pins its dependencies exactly (==); keep those pins verbatim
    spec = [s for s in r.specifier if s.operator == "=="]
    if spec:
        pins[r.name.lower().replace("_", "-")] = spec[0].version
for d in md.distributions():  # everything already installed stays where it is
    name = d.metadata["Name"].lower().replace("_", "-")
    if name != "saelab" and name not in pins:
        pins[name] = d.version.split("+")[0]
open(sys.argv[1], "w").write("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
EOF
grep -q '^torch==2.13.0$' "$CONS" || { echo "setup_peers: constraints lack torch==2.13.0; refusing" >&2; exit 1; }
rc=0
"$VPY" -m pip --disable-pip-version-check -q install -c "$CONS" eai-sparsify==1.3.3 sae-lens==6.54.0 \
    > "$CONS.log" 2>&1 || rc=$?
grep -v "is ignored: it is neither" "$CONS.log" || true
rm -f "$CONS.log"
[ "$rc" = 0 ] || { echo "setup_peers: pip failed (rc $rc); saelab's pinned versions were left untouched" >&2; exit "$rc"; }
"$VPY" -c "
import importlib.metadata as m, torch, transformers, sparsify, sae_lens
assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__
print(f'peers ready: eai-sparsify {m.version(\"eai-sparsify\")}, sae-lens {m.version(\"sae-lens\")}, '
      f'torch {torch.__version__}, transformers {transformers.__version__}')"
