from __future__ import annotations

from django.conf import settings
from rest_framework.pagination import PageNumberPagination


class Pagination(PageNumberPagination):
    """Pages of 50; ``?page_size=`` asks for another size, clamped to API_MAX_PAGE_SIZE
    (a size that is not a positive whole number gives the default), as DRF does."""

    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = settings.API_MAX_PAGE_SIZE
