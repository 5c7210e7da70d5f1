#!/usr/bin/env bash
# Rebuilds the default bundle (cleanplate/default_bundle) from nothing, on a CPU, with fixed seeds.
# Every stage resumes from its newest checkpoint under runs/default/*.work if interrupted.
# Measured on a 2-core CPU: data ~6 min, vae ~9 min, sft ~17 min, lcm ~8 min, discriminator labels
# ~4 min, discriminator ~26 min. One torch thread per
# process: with other CPU work on the machine, 2 OpenMP threads ran 5x slower than 1.
set -euo pipefail
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cd "$(dirname "$0")/.."
cleanplate data synth --n 8000 --out runs/data/train --seed 0 --size 256
cleanplate data synth --n 100 --out runs/data/dev --seed 1000 --size 512 --dev
cleanplate train vae --config training/configs/default_vae.json
cleanplate train sft --config training/configs/default_sft.json
cleanplate train lcm --config training/configs/default_lcm.json
cleanplate data disc-labels --meta runs/data/train/meta.json --out runs/data/disc_train --per-item 1 --seed 0
cleanplate data disc-labels --meta runs/data/dev/meta.json --out runs/data/disc_dev --per-item 4 --seed 1000
cleanplate train discriminator --config training/configs/default_discriminator.json  # lcm bundle + discriminator/
rm -rf cleanplate/default_bundle
cp -r runs/default/disc cleanplate/default_bundle
echo "default bundle: $(du -sh cleanplate/default_bundle | cut -f1)"
