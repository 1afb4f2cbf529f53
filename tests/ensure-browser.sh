#!/bin/sh
# Makes sure a headless browser is on PATH for tests/test_report_html.py, which screenshots report.html.
# Where none is found and this is root with apt-get (a fresh Debian machine, CI), installs Debian's
# chromium and the fonts the screenshot needs, once. Elsewhere it says how to install one; the test then
# fails with the same advice unless ALIGN_KIT_ALLOW_NO_BROWSER=1.
set -eu
for name in chromium chromium-browser google-chrome google-chrome-stable; do
    if command -v "$name" >/dev/null 2>&1; then
        exit 0
    fi
done
packages="chromium fonts-dejavu-core"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[align-kit] installing Debian's $packages for the report test (once)"
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $packages >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends $packages >/dev/null 2>&1; } ||
        echo "[align-kit] apt-get could not install $packages" >&2
    if command -v chromium >/dev/null 2>&1; then
        exit 0
    fi
fi
echo "[align-kit] no headless browser: tests/test_report_html.py will fail; install Chromium" \
    "(Debian: apt-get install chromium) or set ALIGN_KIT_ALLOW_NO_BROWSER=1 to skip that test" >&2
exit 0
