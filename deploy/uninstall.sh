#!/usr/bin/env bash
# Remove the lineside agent service. Idempotent. Keeps the configuration (/etc/lineside) and the state
# (/var/lib/lineside: results, ledgers, outbox, bundles) unless --purge.
#
#   sudo deploy/uninstall.sh [--prefix /opt/lineside] [--purge]
#
# DESTDIR=/some/root works on a staged tree (systemctl is not called, no user is removed).
# Exit codes: 0 done, 1 a step failed, 2 bad arguments.
set -euo pipefail

PREFIX=/opt/lineside
PURGE=0
SERVICE_USER=lineside
UNIT_NAME=lineside-agent.service
DESTDIR="${DESTDIR:-}"

say() { echo "uninstall: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX="${2:?--prefix needs a folder}"; shift 2 ;;
        --prefix=*) PREFIX="${1#--prefix=}"; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "uninstall: unknown argument: $1" >&2; exit 2 ;;
    esac
done
case "$PREFIX" in /?*) ;; *) echo "uninstall: --prefix must be an absolute path other than /, got $PREFIX" >&2; exit 2 ;; esac
PREFIX="${PREFIX%/}"
ROOT="${DESTDIR%/}"

if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
    echo "uninstall: error: run as root (sudo), or set DESTDIR" >&2
    exit 1
fi

if [ -z "$ROOT" ] && command -v systemctl >/dev/null; then
    systemctl disable --now "$UNIT_NAME" 2>/dev/null || true
fi
rm -f "$ROOT/etc/systemd/system/$UNIT_NAME"
rm -rf "$ROOT/etc/systemd/system/$UNIT_NAME.d"
if [ -z "$ROOT" ] && command -v systemctl >/dev/null; then
    systemctl daemon-reload
    systemctl reset-failed "$UNIT_NAME" 2>/dev/null || true
fi
rm -rf "$ROOT$PREFIX"
say "removed the service and $PREFIX"

if [ "$PURGE" = 1 ]; then
    rm -rf "$ROOT/etc/lineside" "$ROOT/var/lib/lineside" "$ROOT/var/cache/lineside" "$ROOT/var/log/lineside"
    if [ -z "$ROOT" ] && id "$SERVICE_USER" >/dev/null 2>&1; then
        userdel "$SERVICE_USER" || true
    fi
    say "purged configuration, state, cache, logs and the $SERVICE_USER user"
else
    say "kept /etc/lineside and /var/lib/lineside (--purge removes them)"
fi
