#!/bin/sh
# none: boot only (the disk was probed by /init; nothing is read or written
# here).  usage: vub.test=none
set -eu
echo "VUB: none-ok"
