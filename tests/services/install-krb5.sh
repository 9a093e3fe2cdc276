#!/usr/bin/env bash
# Installs Debian's MIT Kerberos packages the project needs: libkrb5-dev (krb5-config and headers: pip builds the
# `gssapi` module of the `kerberos` and `test` extras from source, there is no Linux wheel), and the KDC, admin
# and client tools that tests/services/kdc.py runs (krb5kdc, kdb5_util, kadmin.local, kinit).
# Idempotent; non-interactive; run as root (or with passwordless sudo) on Debian. No system service is started
# and no realm configured: the tests' KDC runs from its own files.
#
# Usage: tests/services/install-krb5.sh
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

missing=()
command -v krb5-config >/dev/null || missing+=(libkrb5-dev)
[ -x /usr/sbin/krb5kdc ] || missing+=(krb5-kdc)
[ -x /usr/sbin/kadmin.local ] || missing+=(krb5-admin-server)
command -v kinit >/dev/null || missing+=(krb5-user)
command -v gcc >/dev/null || missing+=(gcc)
if [ ${#missing[@]} -eq 0 ]; then
    echo "krb5: present ($(krb5-config --version))"
    exit 0
fi
echo "krb5: installing Debian packages ${missing[*]}"
as_root apt-get update -qq
as_root apt-get install -y -qq --no-install-recommends "${missing[@]}"
