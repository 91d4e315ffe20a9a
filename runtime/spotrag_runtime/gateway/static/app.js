// The spotrag chat page: one question at a time, streamed from the gateway's
// /v1/rag/query (Server-Sent Events: the passages first, then the answer's
// chat.completion.chunk events, then [DONE]), or from /v1/chat/completions
// where the deployment has no retrieval. No framework and no build step.
"use strict";

(() => {
  const KEY_NAME = "spotrag.apiKey";
  const SETTINGS_NAME = "spotrag.settings";
  const $ = (id) => document.getElementById(id);

  const state = {
    config: null,
    history: [], // the finished turns, as {role, content}, sent with each question
    busy: false,
    controller: null,
    pending: null, // a turn waiting for an API key
    turns: 0,
  };

  // --- small helpers ----------------------------------------------------------

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function apiKey() {
    return sessionStorage.getItem(KEY_NAME) || localStorage.getItem(KEY_NAME) || "";
  }

  function notice(text) {
    const box = $("notice");
    box.textContent = text || "";
    box.hidden = !text;
  }

  function kib(bytes) {
    return bytes < 10240 ? `${(bytes / 1024).toFixed(1)} KiB` : `${Math.round(bytes / 1024)} KiB`;
  }

  function scrollToEnd() {
    const main = $("conversation");
    main.scrollTop = main.scrollHeight;
  }

  // --- settings -----------------------------------------------------------------

  const FIELDS = { "max-tokens": "maxTokens", temperature: "temperature", "top-p": "topP", "top-k": "topK" };

  function loadSettings() {
    const config = state.config;
    let saved = {};
    try {
      saved = JSON.parse(localStorage.getItem(SETTINGS_NAME) || "{}");
    } catch (_) {
      saved = {};
    }
    $("max-tokens").max = config.maxTokensLimit;
    $("max-tokens").value = saved.maxTokens ?? config.defaultMaxTokens;
    $("temperature").value = saved.temperature ?? "";
    $("top-p").value = saved.topP ?? "";
    $("top-k").value = saved.topK ?? config.topK;
    $("top-k").disabled = !config.retrieval;
    for (const id of Object.keys(FIELDS)) $(id).addEventListener("change", saveSettings);
  }

  function saveSettings() {
    const saved = {};
    for (const [id, name] of Object.entries(FIELDS)) if ($(id).value !== "") saved[name] = Number($(id).value);
    localStorage.setItem(SETTINGS_NAME, JSON.stringify(saved));
  }

  // The request's generation settings; a field left empty is the engine's default.
  function settings() {
    const out = {};
    const number = (id) => ($(id).value === "" ? null : Number($(id).value));
    const problems = [];
    const maxTokens = number("max-tokens");
    if (maxTokens !== null) {
      if (!Number.isInteger(maxTokens) || maxTokens < 1 || maxTokens > state.config.maxTokensLimit)
        problems.push(`max tokens must be a whole number from 1 to ${state.config.maxTokensLimit}`);
      else out.max_tokens = maxTokens;
    }
    const temperature = number("temperature");
    if (temperature !== null) {
      if (!(temperature >= 0 && temperature <= 2)) problems.push("temperature must be between 0 and 2");
      else out.temperature = temperature;
    }
    const topP = number("top-p");
    if (topP !== null) {
      if (!(topP > 0 && topP <= 1)) problems.push("top p must be above 0 and at most 1");
      else out.top_p = topP;
    }
    const topK = number("top-k");
    if (state.config.retrieval && topK !== null) {
      if (!Number.isInteger(topK) || topK < 1 || topK > 100) problems.push("top-k must be a whole number from 1 to 100");
      else out.top_k = topK;
    }
    return { out, problems };
  }

  // --- API key ------------------------------------------------------------------

  function showKeyState() {
    const key = apiKey();
    $("key-state").textContent = !state.config.auth
      ? "No API key needed."
      : key
        ? `API key set (…${key.slice(-4)}), kept in this browser only.`
        : "This gateway needs an API key.";
    $("forget-key").hidden = !key;
  }

  function askForKey(message) {
    $("key-message").textContent = message;
    $("key-form").hidden = false;
    $("api-key").focus();
  }

  function useKey(event) {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) {
      $("key-message").textContent = "Enter the API key first.";
      return;
    }
    sessionStorage.removeItem(KEY_NAME);
    localStorage.removeItem(KEY_NAME);
    ($("key-remember").checked ? localStorage : sessionStorage).setItem(KEY_NAME, key);
    $("api-key").value = "";
    $("key-form").hidden = true;
    showKeyState();
    const turn = state.pending;
    state.pending = null;
    if (turn) run(turn);
    else $("question").focus();
  }

  function forgetKey() {
    sessionStorage.removeItem(KEY_NAME);
    localStorage.removeItem(KEY_NAME);
    showKeyState();
  }

  // --- turns ----------------------------------------------------------------------

  // One question and its answer, with what retrying it needs.
  function newTurn(question) {
    const index = ++state.turns;
    $("empty").hidden = true;
    const user = element("article", "turn user");
    user.append(element("p", "text", question));
    const answer = element("article", "turn assistant");
    answer.id = `turn-${index}`;
    answer.dataset.state = "waiting";
    const text = element("div", "answer");
    const status = element("div", "status");
    const sources = element("ol", "sources");
    sources.hidden = true;
    const meta = element("div", "meta");
    answer.append(text, status, sources, meta);
    $("conversation").append(user, answer);
    scrollToEnd();
    return { index, question, history: state.history.slice(), node: answer, text, status, sources, meta };
  }

  function setState(turn, name, message, retry) {
    turn.node.dataset.state = name;
    turn.status.replaceChildren();
    if (!message) return;
    turn.status.append(element("span", "message", message));
    if (retry) {
      const button = element("button", "retry", "Retry");
      button.type = "button";
      button.addEventListener("click", () => run(turn));
      turn.status.append(" ", button);
    }
  }

  // The answer's text with each [n] linked to passage n below it.
  function renderAnswer(turn, answer) {
    const nodes = [];
    let last = 0;
    for (const match of answer.matchAll(/\[(\d+)\]/g)) {
      const target = turn.sources.querySelector(`li[data-number="${match[1]}"]`);
      if (!target) continue;
      nodes.push(document.createTextNode(answer.slice(last, match.index)));
      const link = element("a", "cite", match[0]);
      link.href = `#${target.id}`;
      link.dataset.number = match[1];
      link.addEventListener("click", (event) => {
        event.preventDefault();
        openSource(target, true);
      });
      nodes.push(link);
      last = match.index + match[0].length;
    }
    nodes.push(document.createTextNode(answer.slice(last)));
    turn.text.replaceChildren(...nodes);
  }

  function openSource(item, highlight) {
    const button = item.querySelector("button");
    const passage = item.querySelector(".passage");
    const open = highlight || passage.hidden;
    passage.hidden = !open;
    button.setAttribute("aria-expanded", String(open));
    if (highlight) {
      item.classList.remove("flash");
      void item.offsetWidth; // restart the animation
      item.classList.add("flash");
      item.scrollIntoView({ block: "nearest", behavior: "smooth" });
    }
  }

  function renderSources(turn, passages) {
    turn.sources.replaceChildren();
    for (const passage of passages) {
      const item = element("li", "source");
      item.id = `turn-${turn.index}-source-${passage.number}`;
      item.dataset.number = passage.number;
      const button = element("button", "source-head");
      button.type = "button";
      button.setAttribute("aria-expanded", "false");
      button.append(
        element("span", "number", `[${passage.number}]`),
        element("span", "name", passage.source || passage.id),
        element("span", "score", `score ${Number(passage.score).toFixed(2)}`),
      );
      if (passage.truncated) button.append(element("span", "cut", "cut to fit"));
      const text = element("blockquote", "passage", passage.text);
      text.hidden = true;
      button.addEventListener("click", () => openSource(item, false));
      item.append(button, text);
      turn.sources.append(item);
    }
    turn.sources.hidden = passages.length === 0;
  }

  // --- errors a person can act on ------------------------------------------------

  async function failure(response) {
    let error = {};
    try {
      error = (await response.json()).error || {};
    } catch (_) {
      error = {};
    }
    const detail = error.message ? ` (${error.message})` : "";
    const wait = response.headers.get("Retry-After");
    switch (response.status) {
      case 401:
        return { auth: true, message: apiKey() ? "The gateway did not accept this API key." : "This gateway needs an API key." };
      case 413:
        return { message: "The question is too long for this gateway. Shorten it, or start a new chat if the conversation has grown long." };
      case 429:
        return { retry: true, message: `The gateway is busy: its queue is full. Try again ${wait ? `in ${wait} s` : "in a moment"}.` };
      case 503:
        return {
          retry: true,
          message:
            error.code === "index_not_ready"
              ? "The documents are still being loaded. Try again in a moment."
              : "No engine is serving right now: the deployment may be starting, or replacing an engine whose spot node was taken back. Try again in a moment.",
        };
      case 502:
        return { retry: true, message: `The engines failed to answer this question${detail}. Try again.` };
      default:
        if (response.status >= 400 && response.status < 500)
          return { message: `The gateway refused the question${detail || ` (HTTP ${response.status})`}.` };
        return { retry: true, message: `The gateway failed (HTTP ${response.status})${detail}. Try again.` };
    }
  }

  // --- asking ---------------------------------------------------------------------

  function requestFor(turn, options) {
    const config = state.config;
    if (config.retrieval) {
      return {
        url: "/v1/rag/query",
        body: { model: config.model, question: turn.question, messages: turn.history, stream: true, stream_options: { include_usage: true }, ...options },
      };
    }
    const { top_k: _, ...sampling } = options;
    return {
      url: "/v1/chat/completions",
      body: { model: config.model, messages: [...turn.history, { role: "user", content: turn.question }], stream: true, stream_options: { include_usage: true }, ...sampling },
    };
  }

  function submit(event) {
    event.preventDefault();
    if (state.busy) return;
    const question = $("question").value.trim();
    if (!question) {
      notice("Type a question first.");
      $("question").focus();
      return;
    }
    const { out, problems } = settings();
    if (problems.length) {
      notice(`Check the settings: ${problems.join("; ")}.`);
      $("settings").hidden = false;
      $("settings-toggle").setAttribute("aria-expanded", "true");
      return;
    }
    // The gateway refuses a body over its limit unread (413); say so before sending.
    const limit = state.config.maxBodyBytes;
    const size = (turn) => new TextEncoder().encode(JSON.stringify(requestFor(turn, out).body)).length;
    const alone = size({ question, history: [] });
    if (alone > limit) {
      notice(`The question is too long: ${kib(alone)}, and this gateway accepts at most ${kib(limit)}. Shorten it.`);
      return;
    }
    if (size({ question, history: state.history }) > limit) {
      notice(`The conversation has grown past this gateway's limit of ${kib(limit)}. Start a new chat to ask this.`);
      return;
    }
    notice("");
    $("question").value = "";
    run(newTurn(question));
  }

  async function run(turn) {
    if (state.busy) return;
    if (state.config.auth && !apiKey()) {
      state.pending = turn;
      setState(turn, "needs-key", "This gateway needs an API key: enter it below, and the question is sent.");
      askForKey("This gateway needs an API key.");
      return;
    }
    const { out, problems } = settings();
    if (problems.length) {
      setState(turn, "error", `Check the settings: ${problems.join("; ")}.`, true);
      return;
    }
    const { url, body } = requestFor(turn, out);
    const headers = { "Content-Type": "application/json", Accept: "text/event-stream" };
    if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
    state.busy = true;
    state.controller = new AbortController();
    $("send").disabled = true;
    $("stop").hidden = false;
    turn.text.replaceChildren();
    turn.meta.textContent = "";
    renderSources(turn, []);
    setState(turn, "waiting", "Retrieving and waiting for the first token…");
    const started = performance.now();
    let answer = "";
    let finish = null;
    let usage = null;
    let done = false;
    let chunks = 0;
    let firstTokenAt = null;
    try {
      let response;
      try {
        response = await fetch(url, { method: "POST", headers, body: JSON.stringify(body), signal: state.controller.signal });
      } catch (error) {
        if (error.name === "AbortError") throw error;
        setState(turn, "error", "Could not reach the gateway: it may be restarting. Try again in a moment.", true);
        return;
      }
      if (!response.ok) {
        const problem = await failure(response);
        if (problem.auth) {
          forgetKey();
          state.pending = turn;
          setState(turn, "needs-key", problem.message);
          askForKey(problem.message);
          return;
        }
        setState(turn, "error", problem.message, problem.retry);
        return;
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        let read;
        try {
          read = await reader.read();
        } catch (error) {
          if (error.name === "AbortError") throw error;
          break; // the connection dropped: said below
        }
        if (read.done) break;
        buffer += decoder.decode(read.value, { stream: true }).replace(/\r\n/g, "\n");
        let end;
        let grew = false;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = event
            .split("\n")
            .filter((line) => line.startsWith("data:"))
            .map((line) => line.slice(5).trimStart())
            .join("\n");
          if (!data) continue;
          if (data === "[DONE]") {
            done = true;
            continue;
          }
          const message = JSON.parse(data);
          if (message.error) {
            const partial = answer ? " The part above is what arrived before it." : "";
            const why = String(message.error.message || "the gateway gave no reason").replace(/\.$/, "");
            setState(turn, "error", `The answer failed: ${why}.${partial}`, true);
            return;
          }
          if (message.object === "rag.passages") {
            renderSources(turn, message.passages || []);
            continue;
          }
          if (message.usage) usage = message.usage;
          const choice = (message.choices || [])[0];
          if (!choice) continue;
          if (choice.delta && choice.delta.content) {
            answer += choice.delta.content;
            grew = true;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        if (grew) {
          chunks += 1;
          if (firstTokenAt === null) {
            firstTokenAt = performance.now();
            setState(turn, "streaming");
          }
          turn.node.dataset.chunks = String(chunks);
          renderAnswer(turn, answer);
          scrollToEnd();
        }
      }
      if (!done) {
        const partial = answer ? " The part above is what arrived before it." : "";
        setState(turn, "cut", `The connection to the gateway dropped before the answer was complete.${partial}`, true);
        return;
      }
      renderAnswer(turn, answer);
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      const first = firstTokenAt === null ? "" : `, first token after ${((firstTokenAt - started) / 1000).toFixed(1)} s`;
      const tokens = usage ? `${usage.completion_tokens} tokens, ` : "";
      turn.meta.textContent = `${tokens}${seconds} s${first}`;
      setState(turn, "done", finish === "length" ? "Stopped at the max tokens limit (see Settings)." : "");
      remember(turn, answer);
    } catch (error) {
      if (error.name !== "AbortError") {
        setState(turn, "error", `The page could not read the answer (${error.message}).`, true);
        return;
      }
      setState(turn, "stopped", "Stopped.", true);
      if (answer) remember(turn, answer);
    } finally {
      state.busy = false;
      state.controller = null;
      $("send").disabled = false;
      $("stop").hidden = true;
    }
  }

  // An answered turn joins the conversation sent with the next question: the
  // latest turn in place of what it had before (a stopped partial answer), an
  // older one retried later after the turns since.
  function remember(turn, answer) {
    if (!turn.node.isConnected) return; // from before "New chat"
    const base = turn.index === state.turns ? turn.history : state.history;
    state.history = [...base, { role: "user", content: turn.question }, { role: "assistant", content: answer }];
  }

  function newChat() {
    if (state.controller) state.controller.abort();
    state.history = [];
    state.pending = null;
    $("conversation").replaceChildren($("empty"));
    $("empty").hidden = false;
    notice("");
    $("question").focus();
  }

  // --- start ------------------------------------------------------------------------

  async function start() {
    try {
      const response = await fetch(document.body.dataset.config, { cache: "no-store" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      state.config = await response.json();
    } catch (error) {
      notice(`Could not load this page's settings from the gateway (${error.message}). Reload to try again.`);
      return;
    }
    $("model").textContent = state.config.model;
    document.title = `${state.config.model} · spotrag chat`;
    loadSettings();
    showKeyState();
    $("ask").addEventListener("submit", submit);
    $("key-form").addEventListener("submit", useKey);
    $("forget-key").addEventListener("click", forgetKey);
    $("stop").addEventListener("click", () => state.controller && state.controller.abort());
    $("new-chat").addEventListener("click", newChat);
    $("settings-toggle").addEventListener("click", () => {
      const open = $("settings").hidden;
      $("settings").hidden = !open;
      $("settings-toggle").setAttribute("aria-expanded", String(open));
    });
    $("question").addEventListener("input", () => notice(""));
    $("question").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $("ask").requestSubmit();
      }
    });
    if (state.config.auth && !apiKey()) askForKey("This gateway needs an API key.");
    document.body.dataset.ready = "true";
    $("question").focus();
  }

  start();
})();
