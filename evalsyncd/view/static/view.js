// evalsyncd view: the only script. No framework, no network but this server.
// 1. Live regions: an element with data-live="URL" is refreshed from URL (a
//    server-rendered, escaped HTML fragment) every data-period-ms of the element
//    (default: data-refresh-ms of <body>), while the tab is visible and nothing
//    inside it has the focus. An element inside it with data-poll-ms asks for the
//    next round sooner (the runs list of a fleet still being read).
// 2. "Load more": a button with data-more="URL" fetches the next piece of a
//    long text as JSON {text, next} and appends it as text (never as HTML).
"use strict";
(function () {
  const period = Number(document.body.dataset.refreshMs) || 1000;

  function refresh(el) {
    if (document.hidden || el.contains(document.activeElement) && document.activeElement !== document.body) {
      return Promise.resolve();
    }
    return fetch(el.dataset.live, {credentials: "same-origin", cache: "no-store"})
      .then(function (r) { return r.text(); })
      .then(function (html) {
        if (html !== el.dataset.lastHtml) {
          el.dataset.lastHtml = html;
          el.innerHTML = html;  // a fragment this server rendered, every bucket string escaped
          el.dispatchEvent(new CustomEvent("live-updated", {bubbles: true}));
        }
      })
      .catch(function () { /* the next round retries */ });
  }

  function every(el) {
    // a fragment may ask for its next round sooner (a list still being read)
    const hint = el.querySelector("[data-poll-ms]");
    return (hint && Number(hint.dataset.pollMs)) || Number(el.dataset.periodMs) || period;
  }

  function loop(el) {
    refresh(el).then(function () { setTimeout(function () { loop(el); }, every(el)); });
  }

  document.querySelectorAll("[data-live]").forEach(function (el) {
    setTimeout(function () { loop(el); }, every(el));
  });

  document.addEventListener("click", function (ev) {
    const button = ev.target.closest("button[data-more]");
    if (!button) { return; }
    ev.preventDefault();
    const target = document.getElementById(button.dataset.target);
    button.disabled = true;
    fetch(button.dataset.more, {credentials: "same-origin"})
      .then(function (r) { return r.json(); })
      .then(function (data) {
        if (data.error) { throw new Error(data.error); }
        target.append(document.createTextNode(data.text));
        if (data.next === null) {
          button.remove();
          const note = document.getElementById(button.dataset.target + "-note");
          if (note) { note.remove(); }
        } else {
          const u = new URL(button.dataset.more, location.href);
          u.searchParams.set("offset", data.next);
          button.dataset.more = u.pathname + u.search;
          button.disabled = false;
        }
      })
      .catch(function (err) {
        button.disabled = false;
        button.textContent = "load more (failed: " + err.message + ")";
      });
  });
})();
