"""The evalsyncd benchmark suite: ``python -m bench`` (full) or ``python -m bench --quick``.

Every measurement runs on this machine, against local real servers (SeaweedFS
for S3, fake-gcs-server for GCS), with evalsyncd and its peers (``aws s3 sync``,
``rclone copy``, the reference tinker-cookbook ``FsspecStorage``) on the same
data in the same run, so ratios between them hold on a noisy machine. Bytes and
requests are counted by a TCP proxy between each tool and the server
(``evalsyncd.testing.proxy``), never by the tools themselves. The daemon under test runs as
a child process (``evalsyncd run`` or ``evalsyncd sync --once``), configured
through ``EVALSYNCD_*`` environment variables.
"""
