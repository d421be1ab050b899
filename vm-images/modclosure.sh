#!/bin/bash
# Print, in load order, the kernel modules the test guest needs, resolved
# through the "depends=" field of each .ko's .modinfo section (the kernel
# .deb ships no modules.dep and the host has no kmod/depmod).
#
# usage: modclosure.sh MODROOT [MODULE...]
#   MODROOT  a lib/modules/<kver> directory (has kernel/ and modules.builtin)
#   MODULE   module names; a leading '?' marks one as optional (no error if
#            it is neither built in nor shipped).  Default: $VUB_MODULES or
#            "virtio_pci virtio_blk ?qemu_fw_cfg ?crc32c_generic ?ext4".
# Output: one path per line, relative to MODROOT (e.g. kernel/drivers/virtio/
# virtio.ko), dependencies before dependants, duplicates removed.  Modules
# listed in modules.builtin are skipped.  Exit 1 if a required module or any
# dependency is missing.
# Order matters beyond symbol deps: crc32c_generic comes before ext4 because
# ext4 only soft-depends on crc32c (crypto API), relevant for the generic kernel.
set -eu
MODROOT=${1:?usage: modclosure.sh MODROOT [MODULE...]}
shift
if [ $# -eq 0 ]; then
  # shellcheck disable=SC2086
  set -- ${VUB_MODULES:-virtio_pci virtio_blk ?qemu_fw_cfg ?crc32c_generic ?ext4}
fi
[ -d "$MODROOT/kernel" ] || { echo "modclosure: $MODROOT/kernel missing" >&2; exit 1; }

# module name (dashes folded to underscores) -> relative path
declare -A PATHOF=() BUILTIN=() SEEN=()
while IFS= read -r f; do
  n=${f##*/}; n=${n%.ko}; n=${n//-/_}
  PATHOF[$n]=$f
done < <(cd "$MODROOT" && find kernel -name '*.ko')
if [ -f "$MODROOT/modules.builtin" ]; then
  while IFS= read -r f; do
    n=${f##*/}; n=${n%.ko}; n=${n//-/_}
    BUILTIN[$n]=1
  done < "$MODROOT/modules.builtin"
fi
if [ -z "${PATHOF[*]:-}" ] && (cd "$MODROOT" && find kernel -name '*.ko.*' | grep -q .); then
  echo "modclosure: compressed modules (.ko.xz/.ko.zst) are not supported" >&2; exit 1
fi

visit() { # visit NAME OPTIONAL(0|1)
  local m=${1//-/_} opt=$2 f d
  [ -z "${SEEN[$m]:-}" ] || return 0
  SEEN[$m]=1
  [ -z "${BUILTIN[$m]:-}" ] || return 0
  f=${PATHOF[$m]:-}
  if [ -z "$f" ]; then
    [ "$opt" = 1 ] && { echo "modclosure: optional module $m absent, skipped" >&2; return 0; }
    echo "modclosure: module $m is neither built in nor in $MODROOT" >&2; exit 1
  fi
  for d in $(tr '\0' '\n' < "$MODROOT/$f" | sed -n 's/^depends=//p' | tr ',' ' '); do
    visit "$d" 0
  done
  echo "$f"
}
for m in "$@"; do
  case "$m" in
    \?*) visit "${m#\?}" 1 ;;
    *) visit "$m" 0 ;;
  esac
done
