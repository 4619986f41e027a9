#!/usr/bin/env bash
# Prepare this checkout on Debian 12 or 13: system packages, the tpm2
# OpenSSL provider (>= 1.2) and a virtualenv in .venv with the package and
# its test extras. Safe to run again: every step checks before it acts.
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$top/.venv"
modules="$venv/lib/ossl-modules"

say() { printf '[setup] %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        say "need root for: $*" >&2
        exit 1
    fi
}

packages=(
    swtpm swtpm-tools libtss2-dev mosquitto openssl
    gcc pkg-config python3 python3-dev python3-venv
)

missing_packages() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null \
            | grep -q '^install ok installed$' || printf '%s\n' "$p"
    done
}

apt_updated=no
apt_update_once() {
    if [ "$apt_updated" = no ]; then
        say "apt-get update"
        as_root apt-get update -qq
        apt_updated=yes
    fi
}

install_debian_packages() {
    local missing
    mapfile -t missing < <(missing_packages "${packages[@]}")
    if [ "${#missing[@]}" -eq 0 ]; then
        say "Debian packages present"
        return
    fi
    apt_update_once
    say "installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        >/dev/null
}

# The provider must be 1.2 or newer: 1.1 cannot do TLS client auth.
provider_ok() {
    local version
    version=$(dpkg-query -W -f='${Version}' "$1" 2>/dev/null) || return 1
    dpkg --compare-versions "$version" ge 1.2
}

candidate_version() {
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}'
}

# The archive address this machine already uses for its own suite, so the
# newer suite is fetched from the same mirror.
debian_archive_uri() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk '/^URIs:/ {print $2; exit}' "$f"
    done | grep -v security | head -n 1 || true
    grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null \
        | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {
              print $i; exit}}' | grep -v security | head -n 1 || true
}

unpack_trixie_provider() {
    local work uri
    work=$(mktemp -d)
    chmod 755 "$work"
    uri=$(debian_archive_uri | head -n 1)
    if [ -z "$uri" ]; then
        say "no Debian archive found in the apt sources" >&2
        exit 1
    fi
    mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
    printf 'deb [signed-by=%s] %s trixie main\n' \
        /usr/share/keyrings/debian-archive-keyring.gpg "$uri" \
        >"$work/sources.list"
    local opts=(
        -o "Dir::Etc::SourceList=$work/sources.list"
        -o "Dir::Etc::SourceParts=-"
        -o "Dir::State::Lists=$work/lists"
        -o "Dir::Cache=$work/cache"
        -o "APT::Get::List-Cleanup=0"
        -o "APT::Sandbox::User=root"
    )
    say "fetching tpm2-openssl from Debian 13 (unpacked into .venv only)"
    apt-get "${opts[@]}" update -qq
    (cd "$work" && apt-get "${opts[@]}" download tpm2-openssl >/dev/null)
    dpkg-deb -x "$work"/tpm2-openssl_*.deb "$work/root"
    mkdir -p "$modules"
    cp "$work"/root/usr/lib/*/ossl-modules/tpm2.so "$modules/tpm2.so"
    rm -rf "$work"
}

install_provider() {
    if provider_ok tpm2-openssl; then
        say "tpm2-openssl $(dpkg-query -W -f='${Version}' tpm2-openssl)"
        return
    fi
    if [ -f "$modules/tpm2.so" ]; then
        say "tpm2-openssl provider present in .venv"
        return
    fi
    apt_update_once
    local candidate
    candidate=$(candidate_version tpm2-openssl)
    if [ -n "$candidate" ] && [ "$candidate" != "(none)" ] \
        && dpkg --compare-versions "$candidate" ge 1.2; then
        say "installing tpm2-openssl $candidate"
        as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq tpm2-openssl >/dev/null
        return
    fi
    unpack_trixie_provider
}

pick_python() {
    local p
    for p in /usr/bin/python3 python3; do
        if command -v "$p" >/dev/null 2>&1 \
            && "$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))'
        then
            command -v "$p"
            return
        fi
    done
    say "Python 3.11 or newer is needed" >&2
    exit 1
}

install_venv() {
    local stamp="$venv/.device-agent-installed" want
    want=$(sha256sum "$top/pyproject.toml" | cut -d' ' -f1)
    if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] \
        && [ "$(cat "$stamp")" = "$want" ]; then
        say "virtualenv up to date"
        return
    fi
    if [ ! -x "$venv/bin/python" ]; then
        say "creating .venv"
        "$(pick_python)" -m venv "$venv"
    fi
    say "installing device-agent with its simulator and test extras"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -e "$top[test,sim]"
    printf '%s\n' "$want" >"$stamp"
}

# RabbitMQ is the second broker the tests run against. Its package starts
# a node and epmd listening on every interface; here nothing may listen
# beyond loopback, and tests start their own nodes, so the install runs
# under a policy-rc.d that forbids starting services, and whatever started
# anyway is stopped and disabled.
install_rabbitmq() {
    if [ -z "$(missing_packages rabbitmq-server)" ]; then
        say "rabbitmq-server present"
        return
    fi
    apt_update_once
    local policy=/usr/sbin/policy-rc.d ours=no
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
        as_root chmod 755 "$policy"
        ours=yes
    fi
    say "installing rabbitmq-server (not started)"
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends rabbitmq-server \
        >/dev/null || { [ "$ours" = no ] || as_root rm -f "$policy"; exit 1; }
    [ "$ours" = no ] || as_root rm -f "$policy"
    if [ -d /run/systemd/system ]; then
        as_root systemctl disable --now -q \
            rabbitmq-server.service epmd.service epmd.socket \
            2>/dev/null || true
    fi
    if pgrep -u rabbitmq >/dev/null 2>&1; then
        as_root pkill -u rabbitmq || true
    fi
}

# The MicroPython WebAssembly port, for the tests of the portable core: an
# npm package in .venv/node, run by Node.
wasm_port_version=1.27.0
install_wasm_port() {
    local dir="$venv/node"
    local pkg="$dir/node_modules/@micropython/micropython-webassembly-pyscript"
    if [ -f "$pkg/micropython.mjs" ] \
        && grep -q "\"version\": \"$wasm_port_version\"" "$pkg/package.json"
    then
        say "MicroPython WebAssembly port present"
        return
    fi
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1
    then
        apt_update_once
        say "installing nodejs npm"
        as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends nodejs npm \
            >/dev/null
    fi
    say "installing the MicroPython WebAssembly port into .venv/node"
    mkdir -p "$dir"
    npm install --prefix "$dir" --no-audit --no-fund --silent \
        "@micropython/micropython-webassembly-pyscript@$wasm_port_version" \
        >/dev/null
}

install_debian_packages
install_venv
install_provider
install_rabbitmq
install_wasm_port
say "ready"
