#!/usr/bin/env bash
# Build the QEMU instruction-count plugin: build/plugin/libinsn_count.so.
#
# The plugin must be compiled against the qemu-plugin.h of the installed QEMU. Debian ships that
# header in no binary package, only in the qemu source package, so this script fetches exactly
# the source version of the installed qemu-user / qemu-system-arm with `apt-get source
# --download-only`, through a private deb-src list made from the machine's own Debian entries
# (same mirrors, same keys) and private apt state under build/plugin/apt: the system's apt
# configuration is not touched. Only include/qemu/qemu-plugin.h is taken out of the orig tarball
# (the Debian patches are applied too, by dpkg-source, if any of them touches it).
#
# Idempotent: the header is fetched once per QEMU version, the plugin rebuilt when its source or
# the header changes. Needs: apt, tar + xz, a C compiler, network access to the Debian mirror
# (first run only). `make plugin` runs it; `make setup` depends on that.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/build/plugin"
src="$root/runtime_c/qemu_plugin/insn_count.c"
inc="$out/include"
header="$inc/qemu-plugin.h"
stamp="$inc/qemu-source-version"
lib="$out/libinsn_count.so"
CC=${CC:-cc}

die() {
  echo "build-plugin: $*" >&2
  exit 1
}

qemu_source_version() {
  local p v
  for p in qemu-user qemu-system-arm qemu-user-static; do
    v=$(dpkg-query -W -f='${db:Status-Status} ${source:Package} ${source:Version}' "$p" 2>/dev/null || true)
    if [[ "$v" == "installed qemu "* ]]; then
      echo "${v#installed qemu }"
      return 0
    fi
  done
  return 1
}

# Print deb-src entries for the Debian release this machine runs, made from its own deb entries.
write_deb_src_entries() {
  local codename=$1 dir=$2 f found=0
  local suites="$codename $codename-updates $codename-security $codename/updates"
  : >"$dir/debian-src.list"
  : >"$dir/debian-src.sources"
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f "$f" ]] || continue
    awk -v suites="$suites" '
      BEGIN { n = split(suites, s, " "); for (i = 1; i <= n; i++) ok[s[i]] = 1 }
      $1 == "deb" {
        line = $0; sub(/^deb[ \t]+/, "", line)
        opts = ""
        if (line ~ /^\[/) { opts = substr(line, 1, index(line, "]")); line = substr(line, index(line, "]") + 1) }
        m = split(line, w, /[ \t]+/); k = 1; while (k <= m && w[k] == "") k++
        uri = w[k]; suite = w[k + 1]
        if (!(suite in ok)) next
        comps = ""; for (j = k + 2; j <= m; j++) if (w[j] != "") comps = comps " " w[j]
        print "deb-src " opts " " uri " " suite comps
      }' "$f" >>"$dir/debian-src.list"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] || continue
    awk -v suites="$suites" '
      function flush(   i, n, w, keep, t) {
        if (np == 0) return
        if (types ~ /(^|[ \t])deb([ \t]|$)/ && tolower(enabled) != "no") {
          n = split(suitelist, w, /[ \t]+/); keep = ""
          for (i = 1; i <= n; i++) if (w[i] in ok) keep = keep " " w[i]
          if (keep != "") {
            for (i = 1; i <= np; i++) {
              t = para[i]
              if (tolower(t) ~ /^types:/) t = "Types: deb-src"
              else if (tolower(t) ~ /^suites:/) t = "Suites:" keep
              print t
            }
            print ""
          }
        }
        np = 0; types = ""; suitelist = ""; enabled = ""
      }
      BEGIN { n = split(suites, s, " "); for (i = 1; i <= n; i++) ok[s[i]] = 1; np = 0 }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      {
        para[++np] = $0
        low = tolower($0)
        if (low ~ /^types:/) { types = $0; sub(/^[^:]*:/, "", types) }
        if (low ~ /^suites:/) { suitelist = $0; sub(/^[^:]*:[ \t]*/, "", suitelist) }
        if (low ~ /^enabled:/) { enabled = $0; sub(/^[^:]*:[ \t]*/, "", enabled) }
      }
      END { flush() }' "$f" >>"$dir/debian-src.sources"
  done
  if [[ -s "$dir/debian-src.list" || -s "$dir/debian-src.sources" ]]; then
    found=1
  fi
  if ((found == 0)); then
    # No Debian entry found (unusual layout): Debian's own redirector.
    cat >"$dir/debian-src.list" <<EOF
deb-src http://deb.debian.org/debian $codename main
deb-src http://deb.debian.org/debian $codename-updates main
deb-src http://deb.debian.org/debian-security $codename-security main
EOF
  fi
}

fetch_header() {
  local version=$1 upstream codename apt_dir dl tarball patched
  upstream=${version#*:}
  upstream=${upstream%-*}
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  [[ -n "$codename" ]] || die "cannot tell the Debian release (no VERSION_CODENAME in /etc/os-release)"

  apt_dir="$out/apt"
  dl="$out/apt/download"
  rm -rf "$apt_dir"
  mkdir -p "$apt_dir/parts" "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$dl"
  : >"$apt_dir/sources.list"
  write_deb_src_entries "$codename" "$apt_dir/parts"

  local -a apt_opts=(
    -o "Dir::Etc::SourceList=$apt_dir/sources.list"
    -o "Dir::Etc::SourceParts=$apt_dir/parts"
    -o "Dir::State::Lists=$apt_dir/lists"
    -o "Dir::Cache=$apt_dir/cache"
    -o "Acquire::Languages=none"
  )
  if [[ $(id -u) -eq 0 ]]; then
    # Private directories are not writable by apt's sandbox user; download as root there.
    apt_opts+=(-o "APT::Sandbox::User=root")
  fi

  echo "build-plugin: fetching qemu-plugin.h from Debian source package qemu $version"
  # A mirror without deb-src for one suite only warns; what matters is that qemu is found below.
  apt-get "${apt_opts[@]}" -qq update >"$apt_dir/update.log" 2>&1 || true

  local want="$version"
  if ! (cd "$dl" && apt-get "${apt_opts[@]}" -qq source --download-only "qemu=$want" >"$apt_dir/source.log" 2>&1); then
    # The mirror moved on to another Debian revision: any revision of the same upstream version
    # has the same orig tarball, hence the same header (Debian patches are checked below).
    want=$(apt-cache "${apt_opts[@]}" showsrc qemu 2>/dev/null |
      awk -v up="$upstream" '$1 == "Version:" { v = $2; u = v; sub(/^[0-9]+:/, "", u); sub(/-[^-]*$/, "", u); if (u == up && !found) { print v; found = 1 } }')
    [[ -n "$want" ]] || die "Debian source package qemu $version (or any $upstream revision) not found on the mirrors in $apt_dir/parts; see $apt_dir/update.log and $apt_dir/source.log"
    echo "build-plugin: qemu $version is gone from the mirror; using qemu $want (same upstream $upstream)"
    (cd "$dl" && apt-get "${apt_opts[@]}" -qq source --download-only "qemu=$want" >"$apt_dir/source.log" 2>&1) ||
      die "apt-get source qemu=$want failed; see $apt_dir/source.log"
  fi

  tarball=$(find "$dl" -maxdepth 1 -name 'qemu_*.orig.tar.*' | head -n 1)
  [[ -n "$tarball" ]] || die "no orig tarball among the downloaded qemu source files in $dl"

  # Does a Debian patch touch the header? Then let dpkg-source apply them all.
  patched=0
  local debtar
  debtar=$(find "$dl" -maxdepth 1 -name 'qemu_*.debian.tar.*' | head -n 1)
  if [[ -n "$debtar" ]] && tar -xaOf "$debtar" --wildcards 'debian/patches/*' 2>/dev/null |
    grep -q '^+++ .*include/qemu/qemu-plugin\.h'; then
    patched=1
  fi

  mkdir -p "$inc"
  if ((patched)); then
    echo "build-plugin: a Debian patch changes qemu-plugin.h; unpacking the patched source"
    (cd "$dl" && dpkg-source --no-check -x ./qemu_*.dsc tree >/dev/null) || die "dpkg-source -x failed in $dl"
    cp "$dl/tree/include/qemu/qemu-plugin.h" "$header.tmp"
  else
    tar -xaOf "$tarball" --wildcards '*/include/qemu/qemu-plugin.h' >"$header.tmp" ||
      die "include/qemu/qemu-plugin.h not found in $tarball"
  fi
  [[ -s "$header.tmp" ]] || die "extracted an empty qemu-plugin.h from $tarball"
  mv "$header.tmp" "$header"
  echo "$version" >"$stamp"
  rm -rf "$apt_dir"
}

version=$(qemu_source_version) ||
  die "QEMU is not installed: apt-get install qemu-user qemu-system-arm (or run make setup)"

if [[ ! -s "$header" || ! -f "$stamp" || "$(cat "$stamp")" != "$version" ]]; then
  fetch_header "$version"
fi

if [[ ! -f "$lib" || "$src" -nt "$lib" || "$header" -nt "$lib" ]]; then
  command -v "$CC" >/dev/null || die "no C compiler ($CC): apt-get install build-essential"
  # C11: qemu-plugin.h has an anonymous union. -isystem: warnings are about our code only.
  "$CC" -std=c11 -O2 -fPIC -shared -fvisibility=hidden \
    -Wall -Wextra -Werror -pedantic \
    -isystem "$inc" "$src" -o "$lib.tmp"
  mv "$lib.tmp" "$lib"
  echo "build-plugin: built $lib (QEMU $version)"
fi
