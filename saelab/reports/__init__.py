"""Reports: metric tables (:mod:`.metrics`), the ``saelab compare`` report (:mod:`.compare`) and the static HTML
feature browser (:mod:`.browser`, its page in the package data ``assets/browser.{html,css,js}``)."""
