#!/usr/bin/env bash
# Installs the Slurm and MUNGE binaries that the tests' single-node cluster needs
# (tests/slurm_cluster.py): sbatch/srun/scontrol, slurmctld, slurmd, munged.
#
#   bash tools/install_slurm.sh
#
# Idempotent: when every binary is already on PATH it says so and exits 0.
# As root on Debian/Ubuntu it installs the distribution packages with apt-get; as any
# other user it prints what to install and exits 1.
#
# It installs binaries only and starts no service: the tests run their own daemons, with
# their own key, socket, ports and state directory, and stop them by pid. A policy-rc.d
# that answers 101 ("action forbidden") is put in place for the duration of the install
# so the packages' postinst scripts do not start munged, slurmctld or slurmd.
set -euo pipefail

# The daemons live in /usr/sbin, which a non-root PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"
binaries=(sbatch srun scontrol sinfo slurmctld slurmd munged)
packages=(slurmctld slurmd slurm-client munge)

missing=()
for binary in "${binaries[@]}"; do
  command -v "$binary" >/dev/null || missing+=("$binary")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "[install_slurm] Slurm and MUNGE are installed ($(slurmctld -V))"
  exit 0
fi

if [[ $EUID -ne 0 ]]; then
  echo "[install_slurm] error: missing ${missing[*]}; as root run:" >&2
  echo "  apt-get update && apt-get install -y --no-install-recommends ${packages[*]}" >&2
  echo "  (or run this script as root: sudo bash tools/install_slurm.sh)" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "[install_slurm] error: missing ${missing[*]} and no apt-get here; install Slurm" \
       "(slurmctld, slurmd, client commands) and MUNGE with this system's package manager" >&2
  exit 1
fi

# Forbid service starts during the install; keep an existing policy-rc.d untouched.
policy=/usr/sbin/policy-rc.d
if [[ ! -e "$policy" ]]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  trap 'rm -f "$policy"' EXIT
fi

echo "[install_slurm] installing ${packages[*]} (missing: ${missing[*]})"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}"

for binary in "${binaries[@]}"; do
  command -v "$binary" >/dev/null || { echo "[install_slurm] error: $binary still missing" >&2; exit 1; }
done
echo "[install_slurm] installed $(slurmctld -V)"
