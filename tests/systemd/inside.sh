#!/bin/sh
# PID 1 of fresh PID, mount, UTS, IPC and cgroup namespaces (see sandbox.py): make
# the mounts private to us, then exec systemd. Follows shared/notes/systemd-sandbox.md;
# nothing here may reach the host: every mount below lives in our mount namespace,
# and the host's state is visible read-only.
set -eu
W="$CP_WORK"

# A private /run, and a stash of what we need from the host before covering it.
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mkdir -p /run/stash/dev /run/stash/work
mount --bind /dev /run/stash/dev
mount --bind "$W" /run/stash/work

# Private /tmp, /var/tmp and journal; the work directory back where the units expect it.
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /var/tmp
if [ -d /var/log/journal ]; then mount -t tmpfs -o mode=0755 tmpfs /var/log/journal; fi
mkdir -p "$W"
mount --bind /run/stash/work "$W"

# A minimal private /dev; PID 1's console is a plain file of ours.
mount -t tmpfs -o mode=0755,nosuid tmpfs /dev
for n in null zero full random urandom tty; do
    touch "/dev/$n"
    mount --bind "/run/stash/dev/$n" "/dev/$n"
done
mkdir /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /dev/pts
ln -s pts/ptmx /dev/ptmx
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr
touch /dev/console
mount --bind "$W/console.log" /dev/console
umount /run/stash/dev /run/stash/work
rm -r /run/stash

# cgroup2, rooted (by the cgroup namespace) at the cgroup sandbox.py made for us.
mount -t cgroup2 cgroup2 /sys/fs/cgroup

# The host's state, read-only (per-mount bind remounts: the host's mounts are untouched).
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
mount -o remount,bind,ro /sys
mount -o remount,bind,ro /

# Our units, and everything that could touch the host masked.
mkdir -p /run/systemd/system /run/systemd/system.control
cp -r "$W/units/." /run/systemd/system/
for u in sysinit.target basic.target sockets.target timers.target paths.target \
    multi-user.target graphical.target systemd-tmpfiles-setup.service \
    systemd-tmpfiles-clean.timer systemd-udev-trigger.service systemd-udevd.service \
    systemd-journald-audit.socket systemd-journal-flush.service; do
    ln -s /dev/null "/run/systemd/system.control/$u"
done

exec env -i container=connpark-test PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    /lib/systemd/systemd --unit=connpark-test.target --log-target=console --show-status=no
