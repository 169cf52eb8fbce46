# A do-nothing HTTP sink: reads a POST body and answers 200. The benchmark
# uses it to measure what curl alone costs to send a file over loopback.
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        n = int(self.headers["Content-Length"]); 
        while n > 0:
            b = self.rfile.read(min(n, 1 << 20)); n -= len(b)
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
