#!/usr/bin/env bash
# Idempotent set-up for radtriage on a fresh Debian machine: system packages, a
# Python venv outside the clone (so a new clone or CI run reuses it), and the
# project installed into it in editable mode. Kafka's jars are fetched (and cached
# outside the clone) by the broker launcher the first time a broker starts.
#
#   scripts/install.sh          runtime needs (Java, Maven, Python deps)
#   scripts/install.sh --test   also the test peers (dcmtk's storescu and codecs, gdcmconv,
#                               ojph_compress, Orthanc for the intake bench, dciodvfy,
#                               nginx as a mutual-TLS front)
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
cache="${RADTRIAGE_CACHE:-$HOME/.cache/radtriage}"
venv="${RADTRIAGE_VENV:-$cache/venv}"
python="${RADTRIAGE_PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3

log() { printf '\033[1m[install]\033[0m %s\n' "$*" >&2; }

apt_updated=0
need_pkg() {  # need_pkg COMMAND PACKAGE...
  command -v "$1" >/dev/null && return 0
  shift
  apt_install "$@"
}
need_file() {  # need_file PATH PACKAGE...: for a package that installs no command (a plugin)
  [ -e "$1" ] && return 0
  shift
  apt_install "$@"
}
apt_install() {  # apt_install PACKAGE...
  if [ "$(id -u)" != 0 ]; then
    log "missing $* and not root: install them with your package manager"; exit 1
  fi
  if [ "$apt_updated" = 0 ]; then apt-get update -qq; apt_updated=1; fi
  log "installing $* (Debian)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

need_pkg java openjdk-17-jre-headless
need_pkg mvn maven
if [ "${1:-}" = "--test" ]; then
  need_pkg storescu dcmtk
  # Independent encoders for the transfer-syntax tests (gdcmconv: JPEG 2000), a real PACS
  # to measure intake against (bench/intake.py), and an IOD checker for built objects.
  need_pkg gdcmconv libgdcm-tools
  need_pkg ojph_compress openjph-tools  # HTJ2K: neither dcmtk 3.6.7 nor GDCM 3.0 encode it
  need_pkg Orthanc orthanc
  # Orthanc's DICOMweb plugin: the STOW-RS destination the PACS export is tested against.
  need_file /usr/share/orthanc/plugins/libOrthancDicomWeb.so orthanc-dicomweb
  need_pkg dciodvfy dicom3tools
  need_pkg chromium chromium  # the operator page's browser test (Playwright drives it)
  need_pkg nginx nginx-light  # the FHIR server's TLS front wanting a client certificate (mutual TLS)
fi

mkdir -p "$cache"
if [ ! -x "$venv/bin/python" ]; then
  log "creating venv $venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip wheel setuptools
fi

# Re-run pip only when the dependency list or the clone's location changed.
stamp="$venv/.radtriage-install"
want="$(sha256sum "$here/pyproject.toml" | cut -d' ' -f1) $here"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing radtriage and its Python dependencies into $venv"
  # compat mode puts the clone on sys.path, so a package added later needs no reinstall.
  "$venv/bin/pip" install -q -e "$here[dev,train]" --config-settings editable_mode=compat
  echo "$want" > "$stamp"
fi
log "ready: $venv/bin/radtriage"
