#!/usr/bin/env bash
# Install the lineside agent as a systemd service on an edge box. Idempotent: run it again to upgrade.
#
#   sudo deploy/install.sh [--prefix /opt/lineside] [--no-start] [--python python3]
#
# What it does: a system user `lineside`; a virtual environment under PREFIX/venv with the `agent` extra
# only (never MXNet); /etc/lineside/agent.yaml from deploy/agent.example.yaml (an existing one is kept);
# /etc/lineside/credentials/ for secrets; /var/lib/lineside/ for state and bundles; the unit in
# /etc/systemd/system, enabled and started (unless --no-start).
#
# DESTDIR=/some/root stages everything under that root for packaging or tests: no user is created and
# systemctl is not called; the venv's scripts are rewritten to run from PREFIX once the tree is in place.
# Extra pip arguments (a wheelhouse on an offline box: "--no-index --find-links /media/usb/wheels") go
# in LINESIDE_PIP_ARGS. Exit codes: 0 done, 1 a step failed, 2 bad arguments.
set -euo pipefail

PREFIX=/opt/lineside
START=1
PYTHON=python3
SERVICE_USER=lineside
UNIT_NAME=lineside-agent.service
DESTDIR="${DESTDIR:-}"
SOURCE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
say() { echo "install: $*"; }
die() { echo "install: error: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX="${2:?--prefix needs a folder}"; shift 2 ;;
        --prefix=*) PREFIX="${1#--prefix=}"; shift ;;
        --no-start) START=0; shift ;;
        --python) PYTHON="${2:?--python needs an interpreter}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
case "$PREFIX" in /*) ;; *) echo "install: --prefix must be an absolute path, got $PREFIX" >&2; exit 2 ;; esac
PREFIX="${PREFIX%/}"

ROOT="${DESTDIR%/}"
VENV="$PREFIX/venv"
ETC=/etc/lineside
STATE=/var/lib/lineside

if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo), or set DESTDIR to stage into a folder"
fi
[ -f "$SOURCE/pyproject.toml" ] && [ -d "$SOURCE/agent" ] || die "$SOURCE is not a lineside source tree"
command -v "$PYTHON" >/dev/null || die "$PYTHON not found (apt-get install -y python3 python3-venv)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PYTHON is older than 3.11"

# 1. The service user (a system account without a login shell; video for capture devices and Jetson GPUs).
if [ -z "$ROOT" ]; then
    if ! id "$SERVICE_USER" >/dev/null 2>&1; then
        useradd --system --user-group --home-dir "$STATE" --no-create-home --shell /usr/sbin/nologin \
            --comment "lineside inspection agent" "$SERVICE_USER"
        say "created system user $SERVICE_USER"
    fi
    if getent group video >/dev/null; then usermod -a -G video "$SERVICE_USER"; fi
fi
owner() { # chown only on a real install: a staged tree belongs to the packager
    if [ -z "$ROOT" ]; then chown "$@"; fi
}

# 2. The virtual environment with the agent extra (ONNX Runtime, OpenCV, paho, boto3, prometheus-client).
if [ ! -x "$ROOT$VENV/bin/python" ]; then
    mkdir -p "$ROOT$PREFIX"
    "$PYTHON" -m venv "$ROOT$VENV" || die "cannot create $ROOT$VENV (apt-get install -y python3-venv)"
    say "created $VENV"
fi
# shellcheck disable=SC2086 # LINESIDE_PIP_ARGS is a list of arguments
"$ROOT$VENV/bin/python" -m pip install --quiet --disable-pip-version-check ${LINESIDE_PIP_ARGS:-} \
    "$SOURCE[agent]" || die "pip could not install the agent into $VENV"
if "$ROOT$VENV/bin/python" -c 'import mxnet' 2>/dev/null; then
    die "$VENV holds MXNet: the box runs the agent only; remove the venv and install again"
fi
if [ -n "$ROOT" ]; then
    # Scripts name their interpreter by absolute path: make them name the final one, not the staging one.
    { grep -rlI --null "$ROOT$VENV" "$ROOT$VENV/bin" || true; } | xargs -0 -r sed -i "s#$ROOT$VENV#$VENV#g"
fi
install -D -m 0644 "$SOURCE/README.md" "$ROOT$PREFIX/README.md"
install -D -m 0644 "$SOURCE/deploy/agent.example.yaml" "$ROOT$PREFIX/agent.example.yaml"
say "agent installed in $VENV ($("$ROOT$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("lineside"))'))"

# 3. Configuration: the sample once; an existing file is the plant's and is never touched.
install -d -m 0755 "$ROOT$ETC"
install -d -m 0700 "$ROOT$ETC/credentials"
if [ ! -e "$ROOT$ETC/agent.yaml" ]; then
    install -m 0640 "$SOURCE/deploy/agent.example.yaml" "$ROOT$ETC/agent.yaml"
    owner "root:$SERVICE_USER" "$ROOT$ETC/agent.yaml"
    say "wrote $ETC/agent.yaml from the sample: set station, bundle and source before relying on it"
else
    say "kept the existing $ETC/agent.yaml"
fi

# 4. State: results, ledgers, the MQTT outbox and the bundles live here (StateDirectory= of the unit).
install -d -m 0750 "$ROOT$STATE" "$ROOT$STATE/bundles"
owner -R "$SERVICE_USER:$SERVICE_USER" "$ROOT$STATE"

# 5. The unit, pointing at PREFIX.
install -d -m 0755 "$ROOT/etc/systemd/system"
sed "s#/opt/lineside#$PREFIX#g" "$SOURCE/systemd/$UNIT_NAME" >"$ROOT/etc/systemd/system/$UNIT_NAME.tmp"
chmod 0644 "$ROOT/etc/systemd/system/$UNIT_NAME.tmp"
mv "$ROOT/etc/systemd/system/$UNIT_NAME.tmp" "$ROOT/etc/systemd/system/$UNIT_NAME"

if [ -n "$ROOT" ]; then
    say "staged under $ROOT (no user created, systemctl not called)"
    exit 0
fi
systemctl daemon-reload
systemctl enable "$UNIT_NAME" >/dev/null
if [ "$START" = 1 ]; then
    if "$VENV/bin/lineside-agent" check-config --strict "$ETC/agent.yaml"; then
        systemctl restart "$UNIT_NAME"
        say "started; check it: systemctl status lineside-agent; curl -s http://127.0.0.1:9464/readyz"
    else
        say "enabled but not started: fix $ETC/agent.yaml (above), then: systemctl start lineside-agent"
    fi
else
    say "enabled, not started (--no-start): systemctl start lineside-agent"
fi
