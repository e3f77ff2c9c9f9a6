from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from agentsite import health, metrics

# Under /api/, a URL no route matches answers JSON like every other API error.
handler404 = "orchestration.api.errors.not_found"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include("orchestration.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", metrics.metrics, name="metrics"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("orchestration.urls")),
]
