#!/usr/bin/env bash
# Installs what tests/e2e/browser needs: Debian's chromium (/usr/bin/chromium) and the pinned
# playwright-core in tests/e2e/browser/node_modules. Idempotent; non-interactive; run as root on Debian.
# Playwright's own browser download (`npx playwright install`) is not used: Debian's chromium is.
#
# Usage: tests/services/install-browser.sh        (FORCE_NPM=1 to reinstall node_modules)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BROWSER_DIR="$(cd "$HERE/../e2e/browser" && pwd)"
export DEBIAN_FRONTEND=noninteractive

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

if [ -x /usr/bin/chromium ]; then
    echo "chromium: present ($(/usr/bin/chromium --version 2>/dev/null | head -n1))"
else
    echo "chromium: installing Debian package"
    as_root apt-get update -qq
    as_root apt-get install -y -qq chromium
    /usr/bin/chromium --version 2>/dev/null | head -n1
fi

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "node/npm: installing Debian packages"
    as_root apt-get update -qq
    as_root apt-get install -y -qq --no-install-recommends nodejs npm
fi
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 20 ]; then
    echo "warning: node $(node --version) is older than 20, which playwright-core requires" >&2
fi

if [ -f "$BROWSER_DIR/node_modules/playwright-core/package.json" ] && [ -z "${FORCE_NPM:-}" ]; then
    echo "node_modules: present (playwright-core $(node -p "require('$BROWSER_DIR/node_modules/playwright-core/package.json').version"))"
else
    echo "node_modules: npm ci in $BROWSER_DIR"
    (cd "$BROWSER_DIR" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund)
fi
