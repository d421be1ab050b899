#!/bin/bash
# Fetch the Debian cloud kernel for the test guest, without installing it.
#
# usage: fetch-kernel.sh OUTDIR
# env:   KERNEL_PKG=linux-image-6.1.0-NN-cloud-amd64  pin the versioned package
#        KERNEL_META=linux-image-cloud-amd64          meta package to resolve
#
# Does nothing if OUTDIR/vmlinuz already exists (delete OUTDIR to refetch).
# Otherwise:
#   * resolves the meta package to its versioned package with `apt-cache
#     depends` (the meta .deb itself is empty); runs `apt-get update` only when
#     the package is unknown or its download fails (old ABI versions vanish
#     from bookworm-security);
#   * `apt-get download` + `dpkg-deb -x` into a temp dir (nothing in /boot);
#   * keeps OUTDIR/vmlinuz, OUTDIR/config, OUTDIR/kver, OUTDIR/pkg and
#     OUTDIR/modules/<kver>/ with modules.builtin, modules.order and only the
#     modules the guest needs (see modclosure.sh), not the whole 90 MB tree.
# vmlinuz is written last, so its presence means the directory is complete.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: fetch-kernel.sh OUTDIR}
if [ -f "$OUT/vmlinuz" ]; then
  echo "fetch-kernel: $OUT/vmlinuz exists ($(cat "$OUT/pkg" 2>/dev/null || echo '?')), nothing to do"
  exit 0
fi
META=${KERNEL_META:-linux-image-cloud-amd64}

resolve() {
  if [ -n "${KERNEL_PKG:-}" ]; then
    apt-cache show "$KERNEL_PKG" >/dev/null 2>&1 && echo "$KERNEL_PKG"
  else
    apt-cache depends "$META" 2>/dev/null | awk '/^ *Depends: linux-image-[0-9]/ {print $2; exit}'
  fi
}
PKG=$(resolve || true)
if [ -z "$PKG" ]; then
  echo "fetch-kernel: ${KERNEL_PKG:-$META} unknown to apt, running apt-get update" >&2
  apt-get update -qq
  PKG=$(resolve || true)
  [ -n "$PKG" ] || { echo "fetch-kernel: cannot resolve ${KERNEL_PKG:-$META}" >&2; exit 1; }
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/vub-kernel.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
chmod 0755 "$TMP"; mkdir "$TMP/dl"; chmod 0777 "$TMP/dl"   # apt's _apt sandbox user writes here
download() { (cd "$TMP/dl" && apt-get download -q "$1" </dev/null); }
if ! download "$PKG"; then
  echo "fetch-kernel: download of $PKG failed, running apt-get update and retrying" >&2
  apt-get update -qq
  PKG=$(resolve || true)
  [ -n "$PKG" ] || { echo "fetch-kernel: cannot resolve ${KERNEL_PKG:-$META}" >&2; exit 1; }
  download "$PKG"
fi
DEB=$(ls "$TMP/dl/${PKG}"_*.deb)
dpkg-deb -x "$DEB" "$TMP/x"
KVER=$(ls "$TMP/x/lib/modules")
[ -f "$TMP/x/boot/vmlinuz-$KVER" ] || { echo "fetch-kernel: no vmlinuz-$KVER in $DEB" >&2; exit 1; }

MROOT=$TMP/x/lib/modules/$KVER
mkdir -p "$OUT"
rm -rf "$OUT/modules" "$OUT/vmlinuz.tmp"
mkdir -p "$OUT/modules/$KVER"
for f in modules.builtin modules.order; do
  [ -f "$MROOT/$f" ] && cp "$MROOT/$f" "$OUT/modules/$KVER/"
done
"$HERE/modclosure.sh" "$MROOT" > "$TMP/closure"
while IFS= read -r f; do
  mkdir -p "$OUT/modules/$KVER/$(dirname "$f")"
  cp "$MROOT/$f" "$OUT/modules/$KVER/$f"
done < "$TMP/closure"
cp "$TMP/x/boot/config-$KVER" "$OUT/config"
echo "$KVER" > "$OUT/kver"
echo "$PKG" > "$OUT/pkg"
cp "$TMP/x/boot/vmlinuz-$KVER" "$OUT/vmlinuz.tmp"
mv -f "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
echo "fetch-kernel: $PKG -> $OUT (vmlinuz $(stat -c %s "$OUT/vmlinuz") bytes, modules: $(sed 's,.*/,,; s,\.ko$,,' "$TMP/closure" | tr '\n' ' '))"
