#!/usr/bin/env bash
# Debian packages the test suite talks to for real: the Mosquitto broker and InfluxDB, and
# Chromium with its WebDriver for the dashboard's browser test (tests/test_dashboard_browser.py).
# Installs only what is missing; uses sudo when not root.
set -euo pipefail
pkgs=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || pkgs+=(mosquitto)
command -v influxd >/dev/null 2>&1 || [ -x /usr/bin/influxd ] || pkgs+=(influxdb)
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || pkgs+=(chromium)
command -v chromedriver >/dev/null 2>&1 || [ -x /usr/bin/chromedriver ] || pkgs+=(chromium-driver)
[ ${#pkgs[@]} -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing Debian packages: ${pkgs[*]}" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
