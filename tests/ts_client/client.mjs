// Drives pod_exec_mcp with the official MCP TypeScript SDK: two independent MCP sessions.
// Prints one JSON object with what each call returned; the pytest side judges it.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const url = new URL(process.argv[2]);

async function connect(name) {
  const client = new Client({ name, version: "1.0.0" });
  const transport = new StreamableHTTPClientTransport(url);
  await client.connect(transport);
  return { client, transport };
}

async function run(client, command) {
  const result = await client.callTool({ name: "shell_exec", arguments: { command } });
  return { isError: result.isError ?? false, structured: result.structuredContent };
}

const a = await connect("ts-a");
const b = await connect("ts-b");
const report = {
  protocol: a.transport.protocolVersion ?? null,
  sessionIds: [a.transport.sessionId, b.transport.sessionId],
  tools: (await a.client.listTools()).tools.map((t) => t.name).sort(),
  write: await run(a.client, "echo from-ts > /workspace/ts.txt; echo err >&2; exit 3"),
  readSame: await run(a.client, "cat /workspace/ts.txt"),
  readOther: await run(b.client, "cat /workspace/ts.txt"),
};
// Ending the MCP sessions (DELETE) must remove their sandboxes.
await a.transport.terminateSession();
await b.transport.terminateSession();
await a.client.close();
await b.client.close();
console.log(JSON.stringify(report));
