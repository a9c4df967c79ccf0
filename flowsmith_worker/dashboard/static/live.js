// Live refresh for the FlowSmith dashboard: every element with data-refresh="URL"
// gets that URL's server-rendered fragment again every data-interval ms, while
// the tab is visible, until a fragment holds [data-live-done] (the run ended).
// The pages are complete without this script; they are only not live.
"use strict";
(function () {
  function openDetails(element) {
    var open = [];
    element.querySelectorAll("details[open][id]").forEach(function (d) { open.push(d.id); });
    return open;
  }

  function follow(element) {
    var url = element.getAttribute("data-refresh");
    var interval = parseInt(element.getAttribute("data-interval"), 10) || 5000;

    function refresh() {
      if (document.hidden) {
        setTimeout(refresh, interval);
        return;
      }
      fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } })
        .then(function (response) {
          if (!response.ok) { throw new Error("HTTP " + response.status); }
          return response.text();
        })
        .then(function (html) {
          var open = openDetails(element);
          element.innerHTML = html;  // our own server-rendered, escaped HTML
          open.forEach(function (id) {
            var details = document.getElementById(id);
            if (details) { details.open = true; }
          });
          element.removeAttribute("data-stale");
          if (!element.querySelector("[data-live-done]")) { setTimeout(refresh, interval); }
        })
        .catch(function () {
          element.setAttribute("data-stale", "");  // shown dimmed until the next answer
          setTimeout(refresh, interval * 2);
        });
    }
    setTimeout(refresh, interval);
  }

  document.querySelectorAll("[data-refresh]").forEach(follow);
})();
