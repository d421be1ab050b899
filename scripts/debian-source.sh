# Shared by scripts/deps.sh and vm-images/build-fio.sh (sourced, not run).
# debian_source: the machine's Debian source for $CODENAME as "URI|Signed-By",
# from deb822 files (/etc/apt/sources.list.d/*.sources, except the file named
# by $OURS) or from one-line sources.list entries; empty when there is none.
debian_source() {
  local f
  {
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    [ "$f" = "$OURS" ] && continue
    awk -v want="$CODENAME" '
      function flush() {
        if (types ~ /(^| )deb( |$)/ && uris != "" && (" " suites " ") ~ (" " want " ") && comps ~ /main/) {
          split(uris, u, " "); print u[1] "|" key; found = 1; exit
        }
        types = uris = suites = comps = key = ""
      }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      { line = $0; sub(/^[^:]*:[ \t]*/, "", line) }
      /^Types:/ { types = line } /^URIs:/ { uris = line } /^Suites:/ { suites = line }
      /^Components:/ { comps = line } /^Signed-By:/ { key = line }
      END { if (!found) flush() }' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk -v want="$CODENAME" '
      $1 == "deb" {
        i = 2; key = ""
        if ($2 ~ /^\[/) { for (; i <= NF; i++) { if ($i ~ /signed-by=/) { key = $i; sub(/.*signed-by=/, "", key); sub(/\].*/, "", key) } if ($i ~ /\]$/) { i++; break } } }
        if ($(i+1) == want) { print $i "|" key; exit }
      }' "$f"
  done
  } | head -n1
}
