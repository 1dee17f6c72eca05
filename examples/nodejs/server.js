// The Node.js example: `git push flynnp2p main` builds it with the nodejs
// buildpack (npm install: "ms" from npm); `npm start` runs it on $PORT.
const http = require("http");
const ms = require("ms");

const started = Date.now();
const greeting = process.env.GREETING || "Hello from flynnp2p";
const job = process.env.JOB_ID || "?";

http
  .createServer((req, res) => {
    res.writeHead(200, { "Content-Type": "text/plain; charset=utf-8" });
    res.end(`${greeting}: Node.js ${process.version} with ms, job ${job}, up ${ms(Date.now() - started)}\n`);
  })
  .listen(Number(process.env.PORT || 5000), "0.0.0.0", () => {
    console.log(`listening on port ${process.env.PORT || 5000}`);
  });
