#!/bin/sh
# usage: host/scripts/fresh-caches.sh
# Puts the kernel's dentry and inode caches back to a known state before a
# benchmark run, so that runs made hours apart are comparable. The dentry
# cache grows between runs (a name that was unlinked, or looked up and not
# found, stays in it as a negative entry: one Postfix run of 4,000 messages
# left about 29,000, and a day of benchmarks and builds two million), and a
# long cache slows every path lookup.
# Measured on one machine, the same builds, 4 KiB messages: with two million
# cached entries Postfix used 2,933 us of CPU per message and Postern 325;
# after dropping them, 2,152 and 273. Postern looks up fewer paths per
# message, so a grown cache flatters its ratio to Postfix.
# Drops them only when it may (root); otherwise it says so and goes on.
sync
if [ -w /proc/sys/vm/drop_caches ]; then
  echo 2 > /proc/sys/vm/drop_caches
else
  echo "fresh-caches.sh: not root, the dentry cache is left as it is" >&2
fi
