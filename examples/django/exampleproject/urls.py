from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include("items.urls")),
]

try:  # pip install "sqlrepl[prometheus]"
    import prometheus_client

    import sqlrepl.prometheus
except ImportError:
    pass
else:
    # sqlrepl's series join prometheus_client's default registry. With
    # django-prometheus this register() call is all there is to add: its
    # /metrics view serves that registry.
    sqlrepl.prometheus.register()

    def metrics(request: HttpRequest) -> HttpResponse:
        body = prometheus_client.generate_latest()
        return HttpResponse(body, content_type=prometheus_client.CONTENT_TYPE_LATEST)

    urlpatterns.append(path("metrics", metrics))
