"""Start a server in the background, wait until it listens, talk to it, read its log."""

import sys

CLIENT = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/hello.txt').read().decode())"


def test_static_server_serves_a_file(nsbox):
    nsbox.write_text("/srv/www/hello.txt", "hello from the box\n")
    server = nsbox.spawn([sys.executable, "-u", "-m", "http.server", "8000"], cwd="/srv/www")

    nsbox.wait_for_port(8000, timeout=30)
    response = nsbox.run([sys.executable, "-c", CLIENT], check=True)

    assert response.stdout == "hello from the box\n\n"
    server.wait_for_output(r'"GET /hello.txt HTTP/1.1" 200', timeout=10)
    assert server.poll() is None  # still serving
