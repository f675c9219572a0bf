#!/usr/bin/env bash
# Builds the Debian package of holdfast:
#   host/packaging/build-deb.sh [--binary PATH] [--out DIR]
# PATH defaults to target/release/holdfast (build it first: cargo build --release -p holdfast);
# the package goes to DIR (target/debian), named holdfast_VERSION_ARCH.deb. Needs dpkg-deb,
# strip and objdump (binutils). What it holds: the binary (stripped) in /usr/bin, the systemd
# units holdfast.service and holdfast@.service, a default /etc/holdfast/node.toml (a
# conffile), manual pages for every subcommand, and bash, zsh and fish completions, all made
# by the binary itself. The maintainer scripts create the `holdfast` user and
# /var/lib/holdfast on install and remove them on purge.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
binary="$root/target/release/holdfast"
out="$root/target/debian"
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        *) echo "build-deb.sh: unknown argument $1 (give --binary PATH and/or --out DIR)" >&2; exit 2 ;;
    esac
done
for tool in dpkg-deb strip objdump gzip; do
    command -v "$tool" >/dev/null || { echo "build-deb.sh: $tool is missing (apt-get install dpkg-dev binutils gzip)" >&2; exit 1; }
done
[ -x "$binary" ] || { echo "build-deb.sh: no holdfast binary at $binary; build it (cargo build --release -p holdfast) or give --binary PATH" >&2; exit 1; }

version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)"
arch="$(dpkg --print-architecture)"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT

install -d "$stage/DEBIAN" "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/etc/holdfast" \
    "$stage/usr/share/man/man1" "$stage/usr/share/doc/holdfast" \
    "$stage/usr/share/bash-completion/completions" "$stage/usr/share/zsh/vendor-completions" \
    "$stage/usr/share/fish/vendor_completions.d"
strip --strip-unneeded -o "$stage/usr/bin/holdfast" "$binary"
chmod 0755 "$stage/usr/bin/holdfast"
bin="$stage/usr/bin/holdfast"

install -m 0644 "$here/holdfast.service" "$here/holdfast@.service" "$stage/lib/systemd/system/"
install -m 0644 "$here/node.toml" "$stage/etc/holdfast/node.toml"
"$bin" --quiet manpages --out "$stage/usr/share/man/man1"
gzip -9n "$stage"/usr/share/man/man1/*.1
"$bin" completions bash >"$stage/usr/share/bash-completion/completions/holdfast"
"$bin" completions zsh >"$stage/usr/share/zsh/vendor-completions/_holdfast"
"$bin" completions fish >"$stage/usr/share/fish/vendor_completions.d/holdfast.fish"
install -m 0644 "$here/debian/copyright" "$stage/usr/share/doc/holdfast/copyright"
gzip -9nc "$root/README.md" >"$stage/usr/share/doc/holdfast/README.md.gz"
printf 'holdfast (%s) unstable; urgency=medium\n\n  * Built from the holdfast workspace.\n\n -- holdfast authors <holdfast@example.invalid>  %s\n' \
    "$version" "$(date -R -u -d @"${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || date +%s)}")" \
    | gzip -9n >"$stage/usr/share/doc/holdfast/changelog.Debian.gz"
find "$stage/usr/share" -type f -exec chmod 0644 {} +

# Depends: the shared libraries the binary links, at the newest symbol version it uses.
glibc="$(objdump -T "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)"
depends="libc6 (>= ${glibc}), passwd, util-linux"
if objdump -p "$bin" | grep -q 'NEEDED *libgcc_s'; then
    depends="$depends, libgcc-s1"
fi
installed_kib="$(du -sk --exclude=DEBIAN "$stage" | cut -f1)"
cat >"$stage/DEBIAN/control" <<CONTROL
Package: holdfast
Version: $version
Architecture: $arch
Maintainer: holdfast authors <holdfast@example.invalid>
Installed-Size: $installed_kib
Depends: $depends
Recommends: qemu-utils
Suggests: nbdkit, libnbd-bin
Section: admin
Priority: optional
Homepage: https://example.invalid/holdfast
Description: block-level snapshots mirrored through cascades, with soft locks
 holdfast takes block-level snapshots of images, block devices, NBD exports and
 running QEMU disks, mirrors them asynchronously through cascades of nodes and
 into local or S3-compatible buckets, and carries every downstream's dependency
 on a snapshot upstream as a soft lock, so that no node prunes what someone
 downstream still needs. Retention and lock policies are sandboxed WebAssembly
 components.
CONTROL
echo /etc/holdfast/node.toml >"$stage/DEBIAN/conffiles"
install -m 0755 "$here/debian/postinst" "$here/debian/prerm" "$here/debian/postrm" "$stage/DEBIAN/"
(cd "$stage" && find . -path ./DEBIAN -prune -o -path ./etc -prune -o -type f -printf '%P\0' \
    | sort -z | xargs -0 md5sum) >"$stage/DEBIAN/md5sums"

mkdir -p "$out"
deb="$out/holdfast_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
