"""Assert exactly what an installer changes on disk, read from the box's overlay upper layer."""

INSTALLER = """
set -e
mkdir -p /opt/tool/bin
printf '#!/bin/sh\\necho tool 1.0\\n' > /opt/tool/bin/tool
chmod 755 /opt/tool/bin/tool
ln -sf /opt/tool/bin/tool /usr/local/bin/tool
echo 'tool: installed' >> /etc/motd
rm -f /etc/issue.net
"""


def test_installer_touches_only_what_it_should(nsbox, overlay_root):
    nsbox.run(INSTALLER, check=True)

    assert nsbox.run(["tool"]).stdout == "tool 1.0\n"
    changes = overlay_root.diff()
    assert changes.added == ["/opt/tool", "/opt/tool/bin", "/opt/tool/bin/tool", "/usr/local/bin/tool"]
    assert changes.modified == ["/etc/motd"]
    assert changes.deleted == ["/etc/issue.net"]
