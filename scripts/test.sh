#!/usr/bin/env bash
# ringcast's whole check, as CI runs it (.ci/run execs this). Runnable from any directory.
#
#   scripts/test.sh
#
# 1. installs the system packages tests need, when missing (Debian: chromium for the browser
#    test; redis-server and nginx for the proxy/fan-out tests);
# 2. installs tests/browser's npm packages (playwright-core, from the lockfile) when missing;
# 3. cargo fmt --check, cargo clippy -D warnings, cargo test --workspace --release --no-fail-fast.
#
# Environment:
#   RINGCAST_TEST_PROFILE=debug   run `cargo test` in the debug profile instead of --release
#   SKIP_SYSTEM_DEPS=1            do not touch apt (the browser test then fails if chromium is
#                                 missing; it never passes silently)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SUITE_START=$SECONDS
section() {
  printf '\n==================== %s ====================\n' "$*"
  SECTION_START=$SECONDS
}
done_section() {
  printf -- '---- done in %ss\n' "$((SECONDS - SECTION_START))"
}
die() {
  printf 'scripts/test.sh: %s\n' "$*" >&2
  exit 1
}

# ---------------------------------------------------------------------------------------------
section "system packages"
# Debian package names the tests need.
APT_PACKAGES=(chromium redis-server nginx curl python3 openssl python3-prometheus-client python3-yaml)

pkg_installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

missing=()
for p in "${APT_PACKAGES[@]}"; do
  pkg_installed "$p" || missing+=("$p")
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "all present: ${APT_PACKAGES[*]}"
elif [ "${SKIP_SYSTEM_DEPS:-0}" = 1 ]; then
  echo "SKIP_SYSTEM_DEPS=1: not installing missing packages: ${missing[*]}"
else
  echo "installing: ${missing[*]}"
  SUDO=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "need root or sudo to apt-get install ${missing[*]}"
    SUDO=(sudo)
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update
  "${SUDO[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
fi
done_section

# ---------------------------------------------------------------------------------------------
section "tools"
command -v cargo >/dev/null || die "cargo not found"
command -v node >/dev/null || die "node not found (Node.js >= 20 is needed for tests/browser)"
command -v npm >/dev/null || die "npm not found"
cargo --version
rustc --version
echo "node $(node --version), npm $(npm --version)"
if [ -x /usr/bin/chromium ]; then
  # Debian's wrapper script is noisy on stderr; keep only the version line.
  /usr/bin/chromium --version 2>/dev/null || true
fi
done_section

# ---------------------------------------------------------------------------------------------
section "npm packages (tests/browser)"
# No browser download happens: playwright-core ships none, and the test drives
# Debian's /usr/bin/chromium. Reinstall when the lockfile is newer than the installed tree.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
(
  cd tests/browser
  installed_marker=node_modules/.package-lock.json
  if [ ! -d node_modules/playwright-core ] || [ ! -f "$installed_marker" ] ||
    { [ -f package-lock.json ] && [ package-lock.json -nt "$installed_marker" ]; }; then
    if [ -f package-lock.json ]; then
      npm ci --no-audit --no-fund
    else
      npm install --no-audit --no-fund
    fi
  else
    echo "node_modules up to date"
  fi
)
done_section

# ---------------------------------------------------------------------------------------------
section "cargo fmt --check"
cargo fmt --all -- --check
done_section

# ---------------------------------------------------------------------------------------------
section "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
done_section

# ---------------------------------------------------------------------------------------------
# Why --release: the integration tests start the real `ringcast` binary
# (CARGO_BIN_EXE_ringcast, built in the same profile as the tests) and push it hard: 5,000
# concurrent subscribers, fan-out counts, slow-consumer limits and timing bounds (drain within
# --drain-timeout, heartbeats). An unoptimised server is many times slower on that hot path,
# which makes those tests slow and their timing assertions flaky, and it is not what ships.
# One release build serves both the server and the test binaries, so the suite builds once.
# The cost: debug assertions and overflow checks are off in the tests; clippy above still sees
# all targets, and RINGCAST_TEST_PROFILE=debug runs the suite unoptimised when wanted.
# --no-fail-fast: run every test binary and report all failures, not only the first one.
if [ "${RINGCAST_TEST_PROFILE:-release}" = debug ]; then
  section "cargo test --workspace --no-fail-fast (debug profile)"
  cargo test --workspace --no-fail-fast
else
  section "cargo test --workspace --release --no-fail-fast"
  cargo test --workspace --release --no-fail-fast
fi
done_section

printf '\n==================== ALL CHECKS PASSED in %ss ====================\n' \
  "$((SECONDS - SUITE_START))"
